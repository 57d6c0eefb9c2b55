"""Every ```python block of README.md and docs/*.md runs as pasted (issue 24, points 3 and 4).

Blocks run one by one in a fresh namespace of one worker process (started once, so
that torch is imported once), each in an empty folder of its own. A block that is a
complete script (its first line names the file, ``# ddp_topk.py``, and it has a
``__main__`` guard) is written to that file and run with ``python FILE``. A block is
skipped only where an HTML comment right above it says why: ``<!-- skip: reason -->``.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:<!--\s*skip:\s*(?P<skip>.*?)\s*-->\s*\n)?^```python\n(?P<code>.*?)^```\s*$",
    re.M | re.S,
)
SCRIPT_NAME = re.compile(r"#\s*([\w-]+\.py)\s*$")
BLOCK_TIMEOUT_S = 300
MARK = "\x00pykernels-readme-result "

WORKER = f"""
import contextlib, io, json, os, sys, traceback
for line in sys.stdin:
    req = json.loads(line)
    os.chdir(req["cwd"])
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(req["code"], req["name"], "exec"), {{"__name__": "__main__"}})
        res = {{"ok": True}}
    except BaseException:
        res = {{"ok": False, "error": traceback.format_exc()}}
    res["stdout"] = out.getvalue()
    sys.__stdout__.write({MARK!r} + json.dumps(res) + "\\n")
    sys.__stdout__.flush()
"""


@dataclass
class Block:
    page: Path
    line: int
    code: str
    skip: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def script(self) -> str | None:
        """The file name of a complete script, else None."""
        first = self.code.splitlines()[0] if self.code else ""
        m = SCRIPT_NAME.fullmatch(first.strip())
        return m.group(1) if m and "__main__" in self.code else None


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [
        Block(page, text.count("\n", 0, m.start("code")) + 1, m.group("code"), m.group("skip"))
        for m in FENCE.finditer(text)
    ]


ALL = [b for p in PAGES for b in blocks(p)]


def env() -> dict[str, str]:
    # The worker imports this tree's pykernels, whatever else is installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


class Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env(),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, block: Block, cwd: Path) -> tuple[dict, str]:
        req = {"code": block.code, "name": block.name, "cwd": str(cwd)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        other: list[str] = []  # what bypassed the redirect: C code, warnings
        while True:
            try:
                line = self.lines.get(timeout=BLOCK_TIMEOUT_S)
            except queue.Empty:
                self.close()
                pytest.fail(f"{block.name} ran past {BLOCK_TIMEOUT_S} s")
            if line is None:
                pytest.fail(f"the worker died running {block.name}:\n{''.join(other)}")
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :]), "".join(other)
            other.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.mark.parametrize("block", ALL, ids=[b.name for b in ALL])
def test_block_runs_as_pasted(block: Block, worker: Worker, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(block.skip)
    if block.script:
        (tmp_path / block.script).write_text(block.code)
        out = subprocess.run(
            [sys.executable, block.script],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
        assert out.returncode == 0, f"{block.name}\n{out.stdout}\n{out.stderr}"
        return
    res, other = worker.run(block, tmp_path)
    assert res["ok"], f"{block.name}\n{res['error']}\n{res['stdout']}\n{other}"


def test_there_are_blocks_and_skips_are_few():
    assert len(blocks(ROOT / "README.md")) >= 4
    skipped = [b for b in ALL if b.skip]
    assert len(skipped) <= 2, [(b.name, b.skip) for b in skipped]


# --- the README's first screen, its contents and its claims ------------------------

README = ROOT / "README.md"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_first_screen_holds_the_two_commands_and_the_test_one_is_cis():
    lines = README.read_text().splitlines()[:25]
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = 'pip install torch==2.13.0 && pip install -e ".[test]" && pytest'
    assert test_cmd in lines
    assert test_cmd in ci.splitlines()
    main_job = [x for x in lines if x.startswith("pip install") and "pykernels demo" in x]
    demo_cmd = test_cmd.replace("[test]", "[demo]").replace("pytest", "python -m pykernels demo")
    assert main_job == [demo_cmd]


def test_the_contents_in_the_first_40_lines_lead_to_the_tasks():
    text = README.read_text()
    head = "\n".join(text.splitlines()[:40])
    anchors = {slug(h) for h in re.findall(r"^#{2,3} (.+)$", text, re.M)}
    links = dict(re.findall(r"\[([^\]]+)\]\(#([^)]+)\)", head))
    for task in (
        "Compress my model",
        "Compress my updates (DDP / Flower)",
        "Which CPU am I on and what will I get",
    ):
        assert task in links, task
        assert links[task] in anchors, (task, links[task])


def test_every_relative_link_of_the_docs_resolves():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)


def test_the_readme_claims_no_index_release():
    """pykernels installs from a clone: no `pip install pykernels` from an index and no
    pinned release, which would name a version that pk.__version__ does not have."""
    text = README.read_text()
    assert not re.search(r"pip install pykernels\b", text)
    assert "pykernels==" not in text
    assert "not on PyPI" in text


# --- the Flower App: driven in process, and (opt-in) by `flwr run` --------------------


def readme_block(first_line: str) -> str:
    return next(b.code for b in blocks(README) if b.code.startswith(first_line))


def readme_toml() -> str:
    m = re.search(r"^```toml\n(.*?)^```", README.read_text(), re.M | re.S)
    return m.group(1)


def test_the_flower_app_trains_in_process(tmp_path, monkeypatch, capsys):
    """The README's ServerApp and ClientApp, the names its pyproject.toml gives Flower,
    run two rounds through a grid that calls the ClientApp in this process (no Ray)."""
    pytest.importorskip("flwr")
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    import importlib

    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    (tmp_path / "fl_topk_readme.py").write_text(readme_block("# fl_topk.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    app = importlib.import_module("fl_topk_readme")
    flwr_cfg = tomllib.loads(readme_toml())["tool"]["flwr"]["app"]
    parts = {k: v.split(":") for k, v in flwr_cfg["components"].items()}
    assert {k: m for k, (m, _) in parts.items()} == {"serverapp": "fl_topk", "clientapp": "fl_topk"}
    server, client = getattr(app, parts["serverapp"][1]), getattr(app, parts["clientapp"][1])

    class Grid:
        def __init__(self, nodes: list[int]) -> None:
            self.ctx = {
                n: Context(
                    run_id=7,
                    node_id=n,
                    node_config={"partition-id": i, "num-partitions": len(nodes)},
                    state=RecordDict(),
                    run_config={},
                )
                for i, n in enumerate(nodes)
            }

        def get_node_ids(self):
            return list(self.ctx)

        def send_and_receive(self, messages, timeout=None):
            return [client(m, self.ctx[m.metadata.dst_node_id]) for m in messages]

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    try:
        rounds = 2
        context = Context(
            run_id=7,
            node_id=0,
            node_config={},
            state=RecordDict(),
            run_config={"num-server-rounds": rounds},
        )
        server(Grid([101, 102, 103]), context)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    out = capsys.readouterr().out
    sent = [int(x) for x in re.findall(r"round \d+: (\d+) bytes up", out)]
    dense = [int(x) for x in re.findall(r"bytes up, (\d+) uncompressed", out)]
    assert len(sent) == len(dense) == rounds
    ratio = float(re.search(r"uplink ([\d.]+)x smaller", out).group(1))
    # top-1% of the 9,610 parameters, 3 clients: tens of times fewer bytes
    assert ratio == pytest.approx(sum(dense) / sum(sent), rel=0.01) and ratio > 20
    assert "refused: {1: [], 2: []}" in out


@pytest.mark.skipif(
    os.environ.get("PYKERNELS_TEST_FLWR_RUN") != "1",
    reason="starts a Flower SuperLink and simulation processes (about a minute): "
    "PYKERNELS_TEST_FLWR_RUN=1 runs it",
)
def test_the_flower_app_runs_with_flwr_run(tmp_path):
    """The README's command on the README's two files, against a SuperLink this test
    starts (and stops) itself, on ports of its own, with a Flower home of its own."""
    pytest.importorskip("flwr")
    import shlex
    import shutil
    import socket
    import time

    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "fl_topk.py").write_text(readme_block("# fl_topk.py"))
    (app_dir / "pyproject.toml").write_text(readme_toml())
    cmd = re.search(r"^(FLWR_\S+=1) (flwr run .*)$", README.read_text(), re.M)
    var, flwr_run = cmd.group(1).split("=")[0], cmd.group(2)

    def free_port() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return str(s.getsockname()[1])

    http, control = free_port(), free_port()
    e = env() | {
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": http,
        "FLWR_LOCAL_CONTROL_API_PORT": control,
        var: "1",
    }
    superlink = subprocess.Popen(
        [shutil.which("flower-superlink"), "--insecure", "--simulation"]
        + ["--isolation", "subprocess", "--control-api-address", f"127.0.0.1:{control}"]
        + ["--host", "127.0.0.1", "--port", http, "--database", ":flwr-in-memory:"],
        env=e,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3)
        args = shlex.split(flwr_run)
        args[args.index("num-supernodes=10")] = "num-supernodes=2"
        out = subprocess.run(
            [*args, "--run-config", "num-server-rounds=2"],
            cwd=app_dir,
            env=e,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        superlink.terminate()
        superlink.wait(timeout=30)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert re.search(r"uplink [\d.]+x smaller, refused: \{1: \[\], 2: \[\]\}", text), text
