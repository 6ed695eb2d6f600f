// Anchor for the precompiled <torch/torch.h>; the header itself comes from target_precompile_headers.
