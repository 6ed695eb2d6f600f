// Embeddings written for other tools (`longnet embed`): one .safetensors file, or a folder of .npy files.
//
//   safetensors: one tensor per name ("text", "video", "media", "present", ...), float32 or bool, and the sample ids
//                in the header's __metadata__ as a JSON list under "ids" (row i of every tensor is sample ids[i]).
//   npy folder:  <name>.npy per tensor, plus ids.npy, a numpy unicode array ('<U…') of the sample ids.
// Both load without pickles (`numpy.load(f)`, `safetensors.numpy.load_file(f)`). Files are written atomically.
#pragma once

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace longnet::pipelines {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Tensors: CPU, float32 or bool, first dimension = ids.size(). ConfigError for other dtypes or a row count mismatch.
void write_embeddings_safetensors(const std::filesystem::path& file, const NamedTensors& tensors,
                                  const std::vector<std::string>& ids);
void write_embeddings_npy(const std::filesystem::path& dir, const NamedTensors& tensors,
                          const std::vector<std::string>& ids);

}  // namespace longnet::pipelines
