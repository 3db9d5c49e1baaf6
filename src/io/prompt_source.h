// Prompts for the text-to-image trainers, from JSONL or from webdataset tar shards as NeMo-Aligner's
// DRaFT+ reads them (data.train.dataset_path there).
#pragma once
#include <string>
#include <vector>

namespace aligner {

// The prompts `spec` names, in order. `spec` is one or more sources joined by "::" (webdataset's
// separator), each
//   - a folder: its *.tar files, sorted by name;
//   - a path with braces, dir/shard-{000000..000009}.tar or {a,b}: the shards braceexpand gives
//     (ranges keep the endpoints' zero padding), every one of which must exist;
//   - a path ending in .tar: one shard;
//   - anything else: a JSONL file, each line's string field `field`.
// A shard's samples are its members grouped as webdataset does: consecutive members sharing a key
// (the name up to the first dot of its last component) form one sample, keyed by their extensions
// (lowercased); names without one and __meta__ names are skipped. Each sample's `txt` member is its
// prompt (`field` is for JSONL only): UTF-8, trailing whitespace trimmed. A sample without one, an empty
// prompt, invalid UTF-8, a repeated extension in a sample or a missing shard is an error naming the
// shard and the member.
std::vector<std::string> read_prompts(const std::string& spec, const std::string& field);

// The paths a brace pattern stands for, in braceexpand's order (the leftmost group varies slowest);
// a path without braces is itself. Unbalanced or nested braces are an error.
std::vector<std::string> expand_braces(const std::string& pattern);

}  // namespace aligner
