"""data/fineweb.py: FineWeb's Parquet (and the hub, through a stand-in `datasets` package) ->
llm.c shards named as llm.c's fineweb.py names them.

Expected tokens come from tiktoken directly; shard headers are checked by hand (test_data.py's
helpers). The hub itself is not reached: a fake `datasets` module on PYTHONPATH records how it
was called and serves rows, so the script's choice of dataset, sample, split and streaming is
checked, and the rows' path through the tokenizer.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_data import EOT, check_shard_header, ok, split_at_eot

pa = pytest.importorskip("pyarrow")  # requirements.txt installs it, so CI runs these
pq = pytest.importorskip("pyarrow.parquet")

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

DOCS = ["The quick brown fox jumps over the lazy dog.\n\nA second paragraph, with numbers 1234.",
        "Café au lait — “curly quotes” and emoji 🙂 survive byte-level BPE.",
        "",  # empty: skipped
        "Short.",
        " ".join(f"word{i}" for i in range(100)),  # 200 tokens: with 210-token shards, a shard of its own
        "Tabs\tand\r\nCRLF line ends are kept as they are."]


def fineweb_table(docs):
    """A table with FineWeb's columns (text, id, dump, url, date, file_path, language,
    language_score, token_count); None rows are nulls."""
    n = len(docs)
    return pa.table({"text": pa.array(docs, pa.string()), "id": [f"<urn:uuid:{i}>" for i in range(n)],
                     "dump": ["CC-MAIN-2013-20"] * n, "url": [f"http://example.com/{i}" for i in range(n)],
                     "date": ["2013-05-18T07:24:47Z"] * n, "file_path": ["s3://commoncrawl/x.warc.gz"] * n,
                     "language": ["en"] * n, "language_score": [0.9] * n, "token_count": list(range(n))})


def shards(out, name):
    files = sorted((f for f in os.listdir(out) if f.startswith(name + "_") and f.endswith(".bin")), key=lambda f: f[-10:])
    assert files[0] == f"{name}_val_000000.bin", files
    assert files[1:] == [f"{name}_train_{i:06d}.bin" for i in range(1, len(files))], files
    return np.concatenate([check_shard_header(os.path.join(out, f)) for f in files]), len(files)


def run(*args, env_extra=None, script="fineweb.py", cwd_script_dir=None):
    env = dict(os.environ)
    env.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(REPO_ROOT, "..", "shared", "data", "tiktoken_cache"))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if env_extra:
        env.update(env_extra)
    d = cwd_script_dir or os.path.join(REPO_ROOT, "data")
    return subprocess.run([sys.executable, os.path.join(d, script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=REPO_ROOT)


def test_parquet_file(enc, script_env, tmp_path):
    pq.write_table(fineweb_table(DOCS), tmp_path / "000_00000.parquet", row_group_size=2)  # several row groups
    out = tmp_path / "out"
    ok(run("--input", tmp_path / "000_00000.parquet", "--out", out, "--shard_size", 210, env_extra=script_env))
    toks, nfiles = shards(out, "fineweb")
    assert nfiles == 3  # val: the first three documents; the 200-token one; the last
    got = split_at_eot(toks)
    want = [d for d in DOCS if d]
    assert [g.tolist() for g in got] == [enc.encode_ordinary(d) for d in want]
    assert os.path.exists(out / "gpt2_tokenizer.bin")


def test_parquet_folder_in_sorted_order_with_nulls(enc, script_env, tmp_path):
    src = tmp_path / "sample" / "10BT"
    src.mkdir(parents=True)
    pq.write_table(fineweb_table(DOCS[3:] + [None]), src / "001_00000.parquet")
    pq.write_table(fineweb_table(DOCS[:3]), src / "000_00000.parquet")
    with open(src / "002_extra.jsonl", "w") as f:
        f.write(json.dumps({"text": "and a jsonl file after them"}) + "\n")
    out = tmp_path / "out"
    ok(run("--input", tmp_path / "sample", "--out", out, "-s", 400, "-t", "edu", env_extra=script_env))
    toks, _ = shards(out, "edu_fineweb")  # -t edu names the shards as llm.c does
    want = [d for d in DOCS if d] + ["and a jsonl file after them"]
    assert [g.tolist() for g in split_at_eot(toks)] == [enc.encode_ordinary(d) for d in want]


@pytest.mark.parametrize("case", ["no_text", "not_string", "corrupt", "no_pyarrow"])
def test_parquet_errors(script_env, tmp_path, case):
    path = tmp_path / "in.parquet"
    env = dict(script_env)
    if case == "no_text":
        pq.write_table(pa.table({"content": ["a", "b"], "id": ["1", "2"]}), path)
        want = 'no "text" column (its columns: content, id)'
    elif case == "not_string":
        pq.write_table(pa.table({"text": [1, 2]}), path)
        want = 'row 0: "text" is int, not a string'
    elif case == "corrupt":
        pq.write_table(fineweb_table(DOCS), path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])  # cut off: the footer is gone
        want = "not a readable Parquet file"
    else:
        pq.write_table(fineweb_table(DOCS), path)
        fake = tmp_path / "fake"
        (fake / "pyarrow").mkdir(parents=True)
        (fake / "pyarrow" / "__init__.py").write_text("raise ImportError('no pyarrow here')\n")
        env["PYTHONPATH"] = str(fake)
        want = "reading Parquet needs pyarrow: pip install pyarrow"
    out = tmp_path / "out"
    proc = run("--input", path, "--out", out, env_extra=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert want in proc.stderr and str(path) in proc.stderr
    assert not out.exists() or not [f for f in os.listdir(out) if f.endswith(".bin")]  # no shard written


FAKE_DATASETS = '''
import json, os
class _Split:
    num_examples = {n}
class _Info:
    splits = {{"train": _Split()}}
class _Rows:
    info = _Info()
    def __init__(self, rows): self.rows = rows
    def __iter__(self): return iter(self.rows)
    def __len__(self): return len(self.rows)
def load_dataset(path, name=None, split=None, streaming=False):
    with open(os.environ["FAKE_DATASETS_LOG"], "w") as f:
        json.dump({{"path": path, "name": name, "split": split, "streaming": streaming}}, f)
    if os.environ.get("FAKE_DATASETS_FAIL"):
        raise ConnectionError("the hub cannot be reached")
    return _Rows(json.loads(os.environ["FAKE_DATASETS_ROWS"]))
'''


def fake_hub(tmp_path, rows, fail=False):
    d = tmp_path / "fakehub"
    (d / "datasets").mkdir(parents=True, exist_ok=True)
    (d / "datasets" / "__init__.py").write_text(FAKE_DATASETS.format(n=len(rows)))
    env = {"PYTHONPATH": str(d), "FAKE_DATASETS_LOG": str(tmp_path / "hub_call.json"), "FAKE_DATASETS_ROWS": json.dumps(rows)}
    if fail:
        env["FAKE_DATASETS_FAIL"] = "1"
    return env


@pytest.mark.parametrize("kind,version,dataset,config,folder,name", [
    ("classic", "10B", "HuggingFaceFW/fineweb", "sample-10BT", "fineweb10B", "fineweb"),
    ("edu", "100B", "HuggingFaceFW/fineweb-edu", "sample-100BT", "edu_fineweb100B", "edu_fineweb")])
def test_hub(enc, script_env, tmp_path, kind, version, dataset, config, folder, name):
    # the script runs from a copy of data/, so that its default --out lands in tmp_path
    data = tmp_path / "data"
    data.mkdir()
    for f in ("fineweb.py", "common.py"):
        shutil.copy(os.path.join(REPO_ROOT, "data", f), data / f)
    rows = [{"text": d, "id": str(i)} for i, d in enumerate(DOCS)]
    env = dict(script_env, **fake_hub(tmp_path, rows))
    ok(run("-t", kind, "-v", version, "--shard_size", 500, env_extra=env, cwd_script_dir=str(data)))
    call = json.loads((tmp_path / "hub_call.json").read_text())
    assert call == {"path": dataset, "name": config, "split": "train", "streaming": True}
    toks, _ = shards(data / folder, name)
    assert [g.tolist() for g in split_at_eot(toks)] == [enc.encode_ordinary(d) for d in DOCS if d]


def test_hub_errors(script_env, tmp_path):
    out = tmp_path / "out"
    proc = run("--out", out, env_extra=dict(script_env, **fake_hub(tmp_path, [], fail=True)))
    assert proc.returncode == 1
    assert "could not load HuggingFaceFW/fineweb (sample-10BT) from the Hugging Face hub (ConnectionError" in proc.stderr
    assert "--input" in proc.stderr
    proc = run("--out", out, env_extra=dict(script_env, **fake_hub(tmp_path, [{"content": "x"}])))
    assert proc.returncode == 1
    assert 'HuggingFaceFW/fineweb (sample-10BT): row 0 has no "text" string' in proc.stderr
    # openwebtext.py goes through the same source, without streaming (its 8M documents fit)
    proc = ok(run("--out", out, "--shard_size", 500, script="openwebtext.py",
                  env_extra=dict(script_env, **fake_hub(tmp_path, [{"text": d} for d in DOCS]))))
    assert json.loads((tmp_path / "hub_call.json").read_text()) == {"path": "Skylion007/openwebtext", "name": None,
                                                                    "split": "train", "streaming": False}
    assert int((shards(out, "openwebtext")[0] == EOT).sum()) == 5
