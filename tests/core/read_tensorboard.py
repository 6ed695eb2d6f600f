#!/usr/bin/env python3
"""Prints the scalars of a TensorBoard log folder as JSON {tag: [[step, value], ...]}, read by the tensorboard
package itself (its EventAccumulator), so that a test checks our event files against the real reader.

    read_tensorboard.py DIR
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
