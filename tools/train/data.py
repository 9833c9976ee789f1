"""Corpus, byte tokenizer and synthetic retrieval sequences for the prehoc models.

Vocabulary (fixed, shared with the C++ side): ids 0..255 are raw bytes, 256 BOS,
257 EOS, 258 PAD, 259 MASK (260 ids).

Corpus: every ``*.py`` file under the Python roots of the machine that trains
(the interpreter's stdlib and site-packages), read in a deterministic order,
de-duplicated by content, split into train / held-out by a hash of the path.
"""
from __future__ import annotations

import hashlib
import os
import site
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BOS, EOS, PAD, MASK = 256, 257, 258, 259
VOCAB = 260
TOKENIZER_JSON = {"type": "byte", "bos_token_id": BOS, "eos_token_id": EOS,
                  "pad_token_id": PAD, "mask_token_id": MASK}

MAX_FILE_BYTES = 1 << 20  # skip generated giants (> 1 MiB)
HELDOUT_MOD = 50          # held-out iff int(sha256(path)[:8], 16) % 50 == 0  (~2 %)
SHUFFLE_SEED = 1234       # order of files in the training stream

HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
VALCHARS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", np.uint8)
NL = 10


def encode(text: str, bos: bool = True) -> list[int]:
    ids = list(text.encode("utf-8"))
    return ([BOS] + ids) if bos else ids


def decode(ids) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- corpus
def default_roots() -> list[str]:
    cands = []
    paths = sysconfig.get_paths()
    for k in ("stdlib", "platstdlib", "purelib", "platlib"):
        if paths.get(k):
            cands.append(paths[k])
    try:
        cands += site.getsitepackages()
    except Exception:  # pragma: no cover
        pass
    rs = sorted({os.path.realpath(p) for p in cands if os.path.isdir(p)})
    out: list[str] = []
    for r in rs:  # drop roots nested inside another root
        if any(r == o or r.startswith(o + os.sep) for o in out):
            continue
        out.append(r)
    return out


def is_heldout(path: str) -> bool:
    return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) % HELDOUT_MOD == 0


def _list_py(root: str) -> list[str]:
    out = []
    for dp, dns, fns in os.walk(root, followlinks=False):
        dns.sort()
        for fn in sorted(fns):
            if fn.endswith(".py"):
                p = os.path.join(dp, fn)
                if not os.path.islink(p) and os.path.isfile(p):
                    out.append(p)
    return out


def _read(p: str):
    try:
        with open(p, "rb") as f:
            b = f.read(MAX_FILE_BYTES + 1)
    except OSError:
        return None
    if not b or len(b) > MAX_FILE_BYTES or b"\x00" in b:
        return None
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return b


def load_corpus(roots: list[str] | None = None, verbose: bool = True) -> dict:
    """Returns dict(train_files, heldout_files: list[(path, bytes)], stats)."""
    t0 = time.time()
    roots = roots or default_roots()
    paths = []
    for r in roots:
        paths += _list_py(r)
    with ThreadPoolExecutor(16) as ex:
        blobs = list(ex.map(_read, paths, chunksize=256))
    seen = set()
    kept = []
    n_dup = n_bad = 0
    for p, b in zip(paths, blobs):
        if b is None:
            n_bad += 1
            continue
        h = hashlib.sha1(b).digest()
        if h in seen:
            n_dup += 1
            continue
        seen.add(h)
        kept.append((p, b))
    train = [(p, b) for p, b in kept if not is_heldout(p)]
    held = [(p, b) for p, b in kept if is_heldout(p)]
    listing = "\n".join(sorted(p for p, _ in kept)).encode()
    stats = {
        "roots": roots,
        "py_files_found": len(paths),
        "skipped_unreadable_binary_nonutf8_or_gt1MiB": n_bad,
        "skipped_duplicate_content": n_dup,
        "files": len(kept),
        "bytes": sum(len(b) for _, b in kept),
        "train_files": len(train),
        "train_bytes": sum(len(b) for _, b in train),
        "heldout_files": len(held),
        "heldout_bytes": sum(len(b) for _, b in held),
        "file_list_sha256": hashlib.sha256(listing).hexdigest(),
        "split_rule": f"held-out iff int(sha256(abs_path)[:8],16) % {HELDOUT_MOD} == 0",
        "load_seconds": round(time.time() - t0, 2),
    }
    if verbose:
        print("corpus:", stats, flush=True)
    return {"train_files": train, "heldout_files": held, "stats": stats}


def train_stream(files) -> np.ndarray:
    """Shuffled (seeded) concatenation of file bytes, each file followed by EOS; uint16."""
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(files))
    buf = b"\x00".join(files[i][1] for i in order) + b"\x00"
    arr = np.frombuffer(buf, np.uint8).astype(np.uint16)
    arr[arr == 0] = EOS  # files never contain NUL (filtered), so 0 marks the separators
    return arr


CACHE = "/tmp/prehoc_train_stream.npy"


def cached_train_stream(corpus: dict | None = None):
    """(train stream, corpus stats), cached under /tmp for later commands of one machine."""
    if os.path.exists(CACHE) and os.path.exists(CACHE + ".json"):
        import json
        return np.load(CACHE), json.load(open(CACHE + ".json"))
    import json
    c = corpus or load_corpus()
    s = train_stream(c["train_files"])
    np.save(CACHE, s)
    json.dump(c["stats"], open(CACHE + ".json", "w"))
    return s, c["stats"]


def heldout_text_stream(files) -> bytes:
    """Held-out files in path order joined by a newline (plain text, no EOS)."""
    return b"\n".join(b for _, b in sorted(files))


# ---------------------------------------------------------------- retrieval sequences
def rand_keys(rng, n: int) -> list[bytes]:
    keys: list[bytes] = []
    while len(keys) < n:
        k = b"KEY_" + HEX[rng.integers(0, 16, 4)].tobytes()
        if k not in keys:
            keys.append(k)
    return keys


def rand_value(rng, n: int = 6) -> bytes:
    return VALCHARS[rng.integers(0, len(VALCHARS), n)].tobytes()


def plant_line(key: bytes, val: bytes) -> bytes:
    return key + b' = "' + val + b'"\n'


def query_prefix(key: bytes) -> bytes:
    return key + b' = "'


SUFFIX = b'"\n'


def _arr(b: bytes) -> np.ndarray:
    return np.frombuffer(b, np.uint8).astype(np.uint16)


def assemble(code: np.ndarray, inserts: list[tuple[int, int, bytes]]) -> np.ndarray:
    """Insert byte strings into ``code`` after index ``pos`` (pos = index of a newline;
    -1 = at the very start).  ``inserts`` = (pos, order, bytes)."""
    parts = []
    last = 0
    for pos, _, b in sorted(inserts, key=lambda t: (t[0], t[1])):
        parts.append(code[last:pos + 1])
        parts.append(_arr(b))
        last = pos + 1
    parts.append(code[last:])
    return np.concatenate(parts)


def make_train_retrieval(stream: np.ndarray, rng, n_content: int,
                         max_plants: int = 10, max_mid_queries: int = 4):
    """One training sequence of exactly ``n_content`` tokens (BOS not included).

    Real code with ``n_plants`` lines ``KEY_xxxx = "vvvvvv"`` planted after random
    newlines, some mid-sequence re-queries (the same full line again, later), and a
    final full query line at the very end.  Returns (tokens uint16, (a, b)) where
    [a, b) is the span of the final query's value inside the returned tokens."""
    n_pl = int(rng.integers(2, max_plants + 1))
    keys = rand_keys(rng, n_pl)
    vals = [rand_value(rng) for _ in range(n_pl)]
    n_mid = int(rng.integers(0, max_mid_queries + 1))
    final = int(rng.integers(0, n_pl))
    final_line = plant_line(keys[final], vals[final])
    mid = [int(rng.integers(0, n_pl)) for _ in range(n_mid)]
    extra = sum(len(plant_line(k, v)) for k, v in zip(keys, vals))
    extra += sum(len(plant_line(keys[i], vals[i])) for i in mid) + len(final_line)
    code_len = n_content - extra
    # end the code right after a newline, start wherever that puts it
    end = int(rng.integers(code_len + 4097, len(stream)))
    win = stream[max(0, end - 4096):end]
    nls = np.flatnonzero(win == NL)
    if len(nls):
        end = end - len(win) + int(nls[-1]) + 1
    start = max(0, end - code_len)
    code = stream[start:start + code_len]
    nl = np.flatnonzero(code == NL)
    if len(nl) < 4:
        nl = np.array([-1], dtype=np.int64)
    # plants at random newlines, then mid queries at random newlines after their plant
    ppos = nl[rng.integers(0, len(nl), n_pl)]
    inserts = [(int(ppos[i]), 0, plant_line(keys[i], vals[i])) for i in range(n_pl)]
    for i in mid:
        later = nl[nl >= ppos[i]]
        q = int(later[rng.integers(0, len(later))]) if len(later) else int(ppos[i])
        inserts.append((q, 1, plant_line(keys[i], vals[i])))
    toks = assemble(code, inserts)
    toks = np.concatenate([toks, _arr(final_line)])
    a = len(toks) - len(final_line) + len(query_prefix(keys[final]))
    assert len(toks) == n_content, (len(toks), n_content)
    return toks, (a, a + len(vals[final]))


def make_eval_retrieval(text: bytes, rng, ctx_tokens: int, depth: float,
                        n_distractors: int) -> dict:
    """One eval example whose BOS + prompt + answer + '"\\n' is at most ``ctx_tokens``
    tokens.  Code comes from the held-out text starting at a line start; the target
    line sits at relative depth ``depth`` of the code, distractors at random depths."""
    keys = rand_keys(rng, n_distractors + 1)
    vals = [rand_value(rng) for _ in keys]
    tgt = 0
    extra = sum(len(plant_line(k, v)) for k, v in zip(keys, vals))
    extra += len(query_prefix(keys[tgt])) + len(vals[tgt]) + len(SUFFIX)
    code_len = ctx_tokens - 1 - extra
    while True:
        s = int(rng.integers(0, len(text) - code_len - 1))
        s = text.find(b"\n", s) + 1
        if 0 < s and s + code_len <= len(text):
            break
    chunk = text[s:s + code_len]
    chunk = chunk[:chunk.rfind(b"\n") + 1]  # end on a line boundary
    code = _arr(chunk)
    nl = np.flatnonzero(code == NL)
    tpos = int(nl[min(len(nl) - 1, int(np.searchsorted(nl, depth * len(code))))])
    inserts = [(tpos, 0, plant_line(keys[tgt], vals[tgt]))]
    for i in range(1, len(keys)):
        inserts.append((int(nl[rng.integers(0, len(nl))]), 1, plant_line(keys[i], vals[i])))
    toks = assemble(code, inserts)
    prompt = toks.astype(np.uint8).tobytes() + query_prefix(keys[tgt])
    at = tpos + 1 + sum(len(b) for p, o, b in inserts if o == 1 and p < tpos)
    return {
        "prompt": prompt.decode("utf-8"),
        "answer": vals[tgt].decode(),
        "suffix": SUFFIX.decode(),
        "key": keys[tgt].decode(),
        "depth": round(at / len(prompt), 4),  # where the target line starts, as a fraction
        "n_distractors": n_distractors,
        "n_tokens": 1 + len(prompt) + len(vals[tgt]),  # BOS + prompt + answer
    }


class Batcher:
    """Random windows of the training stream, each row = BOS + n_content tokens;
    a fraction of rows are synthetic retrieval sequences."""

    def __init__(self, stream: np.ndarray, seed: int, retrieval_frac: float):
        self.stream = stream
        self.rng = np.random.default_rng(seed)
        self.frac = retrieval_frac

    def batch(self, rows: int, seq: int):
        """Returns (tokens [rows, seq+1] int64 with BOS first, spans list or None)."""
        n = seq
        out = np.empty((rows, n + 1), dtype=np.int64)
        out[:, 0] = BOS
        offs = self.rng.integers(0, len(self.stream) - n - 1, rows)
        idx = offs[:, None] + np.arange(n)[None, :]
        out[:, 1:] = self.stream[idx]
        spans = [None] * rows
        for r in np.flatnonzero(self.rng.random(rows) < self.frac):
            toks, (a, b) = make_train_retrieval(self.stream, self.rng, n)
            out[r, 1:] = toks
            spans[r] = (a + 1, b + 1)  # shift for BOS
        return out, spans
