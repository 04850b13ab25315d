"""depio.state's hashes: compiled code (formatting does not count, behaviour does), file contents with
the (path, size, mtime_ns, inode) memo, and task arguments with readable differences."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from depio.state.files import HashMemo, content_hash, hash_paths, norm_path
from depio.state.hashing import clear_code_cache, code_hash, is_user_file
from depio.state.values import REPR_LIMIT, args_diff, args_hash, args_record

BASE = '''
import os
import helpers_{tag} as helpers

SCALE = 3


def norm(x):
    return x / SCALE


def train(data, lr=0.1):
    """Train on data."""
    total = norm(len(data)) + helpers.shift(2)
    config = {"a": 1,
              "b": [1, 2,
                    3]}
    for i in range(3):
        if i in {1, 2}:
            total += i * lr
    return os.path.join("x", str(total)), config
'''

HELPERS = '''
def shift(x):
    return x + 1
'''


@pytest.fixture
def load(tmp_path, monkeypatch):
    """load(source, helpers=HELPERS) -> the module `train` lives in, written to tmp_path and imported
    under one module name per test (as a real pipeline re-imports its own file)."""
    tag = uuid.uuid4().hex[:8]
    name = f"state_model_{tag}"
    monkeypatch.syspath_prepend(str(tmp_path))
    made = []

    def _load(source: str, helpers: str = HELPERS):
        for mod in (name, f"helpers_{tag}"):
            sys.modules.pop(mod, None)
        (tmp_path / f"helpers_{tag}.py").write_text(helpers)
        path = tmp_path / f"{name}.py"
        path.write_text(source.replace("{tag}", tag))
        importlib.invalidate_caches()
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        made.append(module)
        return module

    yield _load
    for mod in (name, f"helpers_{tag}"):
        sys.modules.pop(mod, None)
    clear_code_cache()


def digest(module) -> str:
    return code_hash(module.train)[0]


FORMATTING = {
    "comments": BASE.replace("def norm(x):", "# normalise\ndef norm(x):  # by SCALE")
                    .replace("    for i in range(3):", "    # loop\n    for i in range(3):  # three times"),
    "blank lines": BASE.replace("    total = norm", "\n\n    total = norm").replace("    return os", "\n    return os"),
    "continuation indentation": BASE.replace('''              "b": [1, 2,
                    3]}''', '''        "b": [1, 2,
            3]}'''),
    "moved down 10 lines": "\n" * 10 + BASE,
    "re-wrapped expression": BASE.replace("total = norm(len(data)) + helpers.shift(2)",
                                          "total = norm(\n        len(data)\n    ) + helpers.shift(\n        2)"),
}


@pytest.mark.parametrize("edit", sorted(FORMATTING))
def test_formatting_does_not_change_the_code_hash(load, edit):
    before = digest(load(BASE))
    after_module = load(FORMATTING[edit])
    assert digest(after_module) == before, edit


def test_moving_the_function_keeps_the_hash_and_updates_the_line(load):
    first = load(BASE)
    h1, d1 = code_hash(first.train)
    h2, d2 = code_hash(load("\n" * 10 + BASE).train)
    assert h1 == h2
    assert d2.line == d1.line + 10 and d2.name == "train" and d2.file.endswith(".py")


CHANGES = {
    "constant": BASE.replace("if i in {1, 2}", "if i in {1, 3}"),
    "operator": BASE.replace("total += i * lr", "total -= i * lr"),
    "default": BASE.replace("lr=0.1", "lr=0.01"),
    "helper of the same module": BASE.replace("return x / SCALE", "return x // SCALE"),
    "name": BASE.replace("str(total)", "repr(total)"),
    "docstring (text, not formatting)": BASE.replace("Train on data.", "Train on the data."),
    "module constant it reads": BASE.replace("SCALE = 3", "SCALE = 4"),
}


@pytest.mark.parametrize("edit", sorted(CHANGES))
def test_a_change_of_behaviour_changes_the_code_hash(load, edit):
    before = digest(load(BASE))
    assert digest(load(CHANGES[edit])) != before, edit


def test_a_helper_in_another_user_module_counts(load):
    before = digest(load(BASE))
    assert digest(load(BASE, HELPERS.replace("x + 1", "x + 2"))) != before
    assert digest(load(BASE, "# reformatted\n\ndef shift(x):\n\n    return x + 1  # same\n")) == before


def test_library_functions_are_not_followed_and_depio_is_not_user_code():
    assert not is_user_file(os.__file__)
    assert not is_user_file(textwrap.__file__)
    assert not is_user_file(pytest.__file__)                  # site-packages
    assert not is_user_file(code_hash.__code__.co_filename)    # depio itself
    assert not is_user_file("<frozen os>")
    assert is_user_file("<stdin>") and is_user_file(__file__)


def test_cycles_terminate_and_count(load):
    source = BASE + '''

def ping(n):
    return pong(n - 1) if n else 0


def pong(n):
    return ping(n - 1) if n else 1
'''
    module = load(source.replace("return os.path.join", "ping(2)\n    return os.path.join"))
    h1, desc = code_hash(module.train)
    names = {p[0].split(":")[1] for p in desc.parts}
    assert {"train", "norm", "ping", "pong"} <= names
    edited = source.replace("return ping(n - 1) if n else 1", "return ping(n - 2) if n else 1")
    assert code_hash(load(edited.replace("return os.path.join", "ping(2)\n    return os.path.join")).train)[0] != h1


def test_methods_of_user_classes_and_decorated_def_line(load):
    source = BASE + '''

class Model:
    def fit(self, x):
        return x * 2


def wrap(f):
    return f


@wrap
@wrap
def evaluate(x):
    return Model().fit(x)
'''
    module = load(source)
    h1, desc = code_hash(module.evaluate)
    assert desc.line == source.splitlines().index("def evaluate(x):") + 1     # the def, not the decorator
    assert h1 != code_hash(load(source.replace("x * 2", "x * 4")).evaluate)[0]


def test_other_callables_hash_without_error():
    import functools
    h1, _ = code_hash(functools.partial(int, base=2))
    h2, desc = code_hash(len)
    assert h1 and h2 and desc.name == "len"


def test_code_hash_agrees_between_processes(tmp_path):
    """The hash is of compiled code only: a new interpreter (other hash seed, other addresses) gives
    the same digest for the same file."""
    (tmp_path / "pipe_mod.py").write_text("def f(x, s=frozenset({'a', 'b', 'c'})):\n    return x in {'p', 'q'}\n")
    code = "import pipe_mod; from depio.state.hashing import code_hash; print(code_hash(pipe_mod.f)[0])"
    out = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(tmp_path))
        out.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                               check=True, cwd=tmp_path).stdout.strip())
    assert len(out) == 1


# ------------------------------------------------------------------ contents

def old(path: Path, age: float = 3600) -> Path:
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_content_hash_is_of_the_bytes_and_a_touch_is_not_a_change(tmp_path):
    f = tmp_path / "a.csv"
    f.write_bytes(b"1,2\n")
    old(f)
    first = content_hash(f)
    os.utime(f)                                                   # touch
    assert content_hash(f) == first
    f.write_bytes(b"1,3\n")
    assert content_hash(f) != first
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "missing")
    assert hash_paths([tmp_path / "missing"]) == {norm_path(tmp_path / "missing"): None}


def test_memo_reads_nothing_for_unchanged_files(tmp_path):
    files = [tmp_path / f"f{i}.txt" for i in range(50)]
    for i, f in enumerate(files):
        f.write_text(f"content {i}")
        old(f)
    memo = HashMemo()
    first = [content_hash(f, memo) for f in files]
    assert memo.reads == 50 and len(memo.dirty) == 50
    assert [content_hash(f, memo) for f in files] == first and memo.reads == 50
    files[3].write_text("content 3!")                          # a change moves size and mtime
    old(files[3], 100)
    assert content_hash(files[3], memo) != first[3] and memo.reads == 51


def test_a_file_written_just_now_is_not_memoised(tmp_path):
    f = tmp_path / "fresh.txt"
    f.write_text("x")
    memo = HashMemo()
    content_hash(f, memo)
    content_hash(f, memo)
    assert memo.reads == 2 and not memo.entries          # it may change again within one mtime tick


def test_large_file_is_read_in_chunks(tmp_path):
    import hashlib
    data = os.urandom(3 * (1 << 20) + 17)
    f = tmp_path / "big.bin"
    f.write_bytes(data)
    assert content_hash(f) == hashlib.blake2b(data, digest_size=8).hexdigest()


def test_a_directory_counts_by_its_files(tmp_path):
    def tree(root: Path) -> Path:
        (root / "sub").mkdir(parents=True)
        (root / "a.txt").write_text("a")
        (root / "sub" / "b.txt").write_text("b")
        return root

    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert content_hash(one) == content_hash(two)
    (one / "empty").mkdir()
    os.utime(one / "a.txt")
    assert content_hash(one) == content_hash(two)              # an empty folder and a touch: no change
    (one / "sub" / "b.txt").write_text("B")
    assert content_hash(one) != content_hash(two)
    (one / "sub" / "b.txt").write_text("b")
    (one / "sub" / "b.txt").rename(one / "sub" / "c.txt")
    assert content_hash(one) != content_hash(two)


# ------------------------------------------------------------------ arguments

def test_args_record_and_readable_diff():
    a = args_record({"lr": 0.1, "out": Path("build/x.txt"), "layers": [64, 32], "name": "run"})
    b = args_record({"lr": 0.01, "out": Path("build/x.txt"), "layers": [64, 32], "name": "run"})
    assert args_diff(a, b) == ["lr: 0.1 -> 0.01"]
    assert args_hash({"lr": 0.1}) != args_hash({"lr": 0.01})
    assert args_hash({"p": Path("1")}) != args_hash({"p": "1"}) != args_hash({"p": 1})
    c = args_record({"lr": 0.1, "out": Path("build/y.txt"), "layers": [64, 32], "name": "run", "seed": 3})
    assert args_diff(a, c) == ["out: build/x.txt -> build/y.txt", "seed: (none) -> 3"]


def test_long_and_unrepresentable_arguments():
    long_a, long_b = "x" * 500, "x" * 499 + "y"
    a, b = args_record({"s": long_a}), args_record({"s": long_b})
    assert len(a["s"][0]) == REPR_LIMIT + 1 and a != b
    assert args_diff(a, b) == [f"s: {a['s'][0]} (changed)"]
    lam = args_record({"f": lambda x: x + 1})                  # cloudpickle
    assert lam["f"][1]
    locks = [threading.Lock(), threading.Lock()]               # unpicklable: counted by their type
    one, two = args_record({"l": locks[0]}), args_record({"l": locks[1]})
    assert one != two and args_diff(one, two) == [] and args_hash({"l": locks[0]}) == args_hash({"l": locks[1]})
    things = [Thing(1), Thing(1), Thing(2)]                     # reprs with addresses, compared by pickle
    assert args_diff(args_record({"t": things[0]}), args_record({"t": things[1]})) == []
    assert args_diff(args_record({"t": things[0]}), args_record({"t": things[2]}))


class Thing:
    def __init__(self, v):
        self.v = v


def test_args_hash_does_not_depend_on_the_hash_seed(tmp_path):
    code = ("from depio.state.values import args_hash; "
            "print(args_hash({'s': {'alpha', 'beta', 'gamma'}, 'd': {'z': 1, 'a': frozenset({'q', 'r'})}}))")
    out = {subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=seed),
                          capture_output=True, text=True, check=True).stdout.strip() for seed in ("1", "2", "3")}
    assert len(out) == 1
