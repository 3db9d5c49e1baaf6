"""Checks aligner's hand-written TensorBoard event files with TensorBoard's own reader.

    python3 scripts/check_tensorboard.py DIR EXPECTED_JSON

DIR holds the events.out.tfevents.* file(s) that aligner's TensorBoardWriter wrote; EXPECTED_JSON
is {tag: [[step, value], ...]} of what was written, e.g. as the C++ test leaves them:

    mkdir -p /tmp/tbcheck && rm -f /tmp/tbcheck/*
    ALIGNER_TB_OUT=/tmp/tbcheck BUILD/tests/aligner_tests --gtest_filter='TensorBoard.*'
    python3 scripts/check_tensorboard.py /tmp/tbcheck /tmp/tbcheck/expected.json

Checks every record's framing and CRCs (with TensorBoard's CRC-32C), that each file starts with the
"brain.Event:2" version event, and that TensorBoard's EventAccumulator finds exactly the expected
tags with the expected (step, value) points in order. Values are compared after rounding the
expected ones to float32, which is what the file stores. Prints OK or FAIL lines; exits 1 on any
failure.
"""
import glob
import json
import os
import struct
import sys
import time

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

failures = []


def fail(message):
    failures.append(message)
    print("FAIL: " + message)


def to_float32(value):
    return struct.unpack("<f", struct.pack("<f", value))[0]


def check_framing(path):
    """TensorBoard's reader takes a record with a bad CRC for the end of the file (a truncated
    write) and says nothing, so the CRCs are checked here too, where a mismatch is reported."""
    data = open(path, "rb").read()
    pos, count = 0, 0
    while pos < len(data):
        if pos + 12 > len(data):
            return fail(f"{path}: {len(data) - pos} stray bytes after record {count}")
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if length_crc != masked_crc32c(header):
            return fail(f"{path}: record {count}: length CRC {length_crc:#x} != {masked_crc32c(header):#x}")
        end = pos + 12 + length
        if end + 4 > len(data):
            return fail(f"{path}: record {count} is truncated")
        (data_crc,) = struct.unpack("<I", data[end:end + 4])
        if data_crc != masked_crc32c(data[pos + 12:end]):
            return fail(f"{path}: record {count}: data CRC mismatch")
        pos, count = end + 4, count + 1
    return count


def check_events(path):
    events = list(EventFileLoader(path).Load())
    if not events:
        return fail(f"{path}: TensorBoard read no events")
    first = events[0]
    if first.file_version != "brain.Event:2" or first.step != 0:
        fail(f"{path}: first event is not the version event: {first}")
    now = time.time()
    for event in events:
        # Seconds since the epoch, written just now by the test: anything else is a bad encoding.
        if not 1.5e9 < event.wall_time <= now + 60:
            fail(f"{path}: implausible wall_time {event.wall_time} at step {event.step}")
    return len(events)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    directory, expected_path = sys.argv[1], sys.argv[2]
    with open(expected_path, encoding="utf-8") as f:
        expected = json.load(f)

    files = sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")))
    if not files:
        fail(f"no events.out.tfevents.* file in {directory}")
    for path in files:
        records = check_framing(path)
        events = check_events(path)
        if records is not None and events is not None and records != events:
            fail(f"{path}: {records} records but TensorBoard read {events} events")

    acc = event_accumulator.EventAccumulator(directory, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    if tags != set(expected):
        fail(f"scalar tags {sorted(tags)} != expected {sorted(expected)}")
    points = 0
    for tag in sorted(tags & set(expected)):
        got = [(s.step, s.value) for s in acc.Scalars(tag)]
        want = [(int(step), to_float32(value)) for step, value in expected[tag]]
        if got != want:
            fail(f"{tag}: TensorBoard read {got}, expected {want}")
        points += len(got)

    if failures:
        print(f"FAIL: {len(failures)} problem(s)")
        sys.exit(1)
    print(f"OK: {len(tags)} tags, {points} points in {len(files)} file(s) read back by TensorBoard")


if __name__ == "__main__":
    main()
