"""data/tinystories.py: TinyStories' archive (or its folder) -> llm.c's TinyStories_{val,train}.bin.

The archive here is made in the test, in TinyStories' layout (dataNN.json: a JSON list of
{"story", ...}), with its files out of name order; the expected tokens come from tiktoken
directly and the headers are checked by hand (test_data.py's helpers).
"""

import io
import json
import os
import tarfile

import pytest

from test_data import EOT, OFFLINE, check_shard_header, ok, split_at_eot

STORIES = {
    0: ["  Once upon a time, there was a cat.\n", "The dog ran to the park. \"Hi!\" he said."],
    1: ["Lily had a red ball.", "   ", "Tom and Sue played all day.\n\nThen they slept."],
    2: ["A bird sang a song.", "The end."],
    3: ["Ben found a shiny rock."],
}


def json_bytes(stories):
    return json.dumps([{"story": s, "instruction": {"words": ["x"]}, "source": "GPT-4"} for s in stories]).encode()


def make_archive(path, order=(2, 0, 3, 1), extra=None):
    with tarfile.open(path, "w:gz") as tf:
        for k in order:
            data = json_bytes(STORIES[k])
            info = tarfile.TarInfo(f"data{k:02d}.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def expected(enc, keys):
    return [enc.encode_ordinary(s.strip()) for k in keys for s in STORIES[k] if s.strip()]


def read_split(out, split, name="TinyStories"):
    return [d.tolist() for d in split_at_eot(check_shard_header(os.path.join(out, f"{name}_{split}.bin")))]


def test_archive(run_script, enc, tmp_path):
    arc = tmp_path / "TinyStories_all_data.tar.gz"
    make_archive(arc, extra={"README.txt": b"not a story file"})
    out = tmp_path / "out"
    proc = ok(run_script("tinystories.py", "--input", arc, "--out", out))
    assert read_split(out, "val") == expected(enc, [0])  # data00 is val, whatever the archive's order
    assert read_split(out, "train") == expected(enc, [1, 2, 3])
    assert os.path.exists(out / "gpt2_tokenizer.bin")
    assert "train: data01.json .. data03.json (3 files)" in proc.stdout


def test_folder_and_max_files(run_script, enc, tmp_path):
    src = tmp_path / "TinyStories_all_data"
    src.mkdir()
    for k in (3, 1, 0, 2):
        (src / f"data{k:02d}.json").write_bytes(json_bytes(STORIES[k]))
    out = tmp_path / "out"
    ok(run_script("tinystories.py", "--input", src, "--out", out, "--max_files", 3))
    assert read_split(out, "val") == expected(enc, [0])
    assert read_split(out, "train") == expected(enc, [1, 2])
    # the archive with its files out of order: the first three by name all the same
    arc = tmp_path / "a.tar.gz"
    make_archive(arc, order=(3, 2, 1, 0))
    out2 = tmp_path / "out2"
    ok(run_script("tinystories.py", "--input", arc, "--out", out2, "--max_files", 3))
    assert (out2 / "TinyStories_train.bin").read_bytes() == (out / "TinyStories_train.bin").read_bytes()


def test_char_vocab(run_script, tmp_path):
    arc = tmp_path / "a.tar.gz"
    STORIES[4] = ["Caf\u00e9 is not ASCII.", "But this is."]
    try:
        make_archive(arc, order=(0, 4))
    finally:
        del STORIES[4]
    out = tmp_path / "out"
    proc = ok(run_script("tinystories.py", "--input", arc, "--out", out, "--vocab", "char"))
    chars = "\n " + "".join(chr(c) for c in range(33, 127))
    train = check_shard_header(str(out / "TinyStories_char_train.bin"))
    assert "".join(chars[t] for t in train) == "\nBut this is."  # EOT is id 0, a newline
    assert "3 stories kept, 1 dropped (a character outside the vocabulary) of 4; most common causes (documents): '\u00e9' 1" \
        in proc.stdout


@pytest.mark.parametrize("case", ["bad_json", "no_story", "one_file", "max_files", "not_tar", "missing"])
def test_errors(run_script, tmp_path, case):
    arc = tmp_path / "in.tar.gz"
    if case == "bad_json":
        make_archive(arc, order=(0,), extra={"data01.json": b"[{\"story\": "})
        want = "data01.json: not valid JSON"
    elif case == "no_story":
        make_archive(arc, order=(0,), extra={"data01.json": json.dumps([{"text": "x"}]).encode()})
        want = 'data01.json: entry 0 has no "story" string'
    elif case == "one_file":
        make_archive(arc, order=(0,))
        want = "holds 1 dataNN.json file(s); the first is the val split, so at least 2 are needed"
    elif case == "max_files":
        make_archive(arc)
        proc = run_script("tinystories.py", "--input", arc, "--out", tmp_path / "out", "--max_files", 1)
        assert proc.returncode == 1 and "--max_files 1: give at least 2" in proc.stderr
        return
    elif case == "not_tar":
        arc.write_bytes(b"this is not an archive")
        want = "cannot read"
    else:
        arc = tmp_path / "nope.tar.gz"
        want = "input not found"
    out = tmp_path / "out"
    proc = run_script("tinystories.py", "--input", arc, "--out", out)
    assert proc.returncode == 1, proc.stdout
    assert want in proc.stderr, proc.stderr
    assert not out.exists() or not [f for f in os.listdir(out) if f.endswith(".bin")]  # nothing written


def test_download_offline(run_script, tmp_path):
    out = tmp_path / "out"
    proc = run_script("tinystories.py", "--out", out, env_extra=OFFLINE)
    assert proc.returncode == 1
    assert "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz" in proc.stderr
    assert "--input" in proc.stderr
    assert not (out / "TinyStories_all_data.tar.gz").exists()  # no partial download under the final name
