"""Writes examples/data/demo/: the demo's SFT data, real hh-rlhf conversations (the chosen side)
as chat messages, split into training and validation, plus a few prompts for before/after samples.

    python3 scripts/make_demo_data.py
"""
import json
import re

SRC = "examples/data/hh-rlhf/harmless-test-600.jsonl"


def messages(text):
    turns = re.split(r"\n\n(Human|Assistant): ", "\n\n" + text.strip())[1:]
    out = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
           for who, body in zip(turns[0::2], turns[1::2])]
    while out and out[-1]["role"] != "assistant":
        out.pop()
    ok = out and all(m["content"] for m in out) and all(
        m["role"] == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(out))
    return out if ok else None


def main():
    convs = [m for m in (messages(json.loads(l)["chosen"]) for l in open(SRC)) if m]
    with open("examples/data/demo/chat_train.jsonl", "w") as f:
        for m in convs[:-60]:
            f.write(json.dumps({"messages": m}) + "\n")
    with open("examples/data/demo/chat_val.jsonl", "w") as f:
        for m in convs[-60:]:
            f.write(json.dumps({"messages": m}) + "\n")
    with open("examples/data/demo/prompts.jsonl", "w") as f:
        for m in convs[-60:][:3]:
            f.write(json.dumps({"messages": m[:1]}) + "\n")
    print(len(convs), "conversations")


if __name__ == "__main__":
    main()
