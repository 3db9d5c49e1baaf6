// reward.command: a verifier that the user writes in any language, run as one long-lived process
// (started once, so that its own start-up and state cost nothing per rollout).
//
// Protocol: for each query one JSON line on the program's stdin, {"prompt": prompt text,
// "response": response text, ...every other field of the prompt's JSONL line}; the program writes
// one number per line on stdout, in order. A score() call writes all its lines before waiting for
// the answers, so a program may read ahead and answer in batches. Its stderr is kept for errors.
#pragma once
#include <memory>
#include <string>

#include "reward/reward.h"

namespace aligner {

// Starts `command` with /bin/sh -c in a process group of its own. Each score() call must be
// answered within timeout_s; a program that exits, writes anything but one finite number per line,
// or runs past the timeout is killed, and that score() call and every later one is a one-line
// error naming the command (with its exit status and the end of its stderr).
std::unique_ptr<Reward> start_command_reward(const std::string& command, double timeout_s);

}  // namespace aligner
