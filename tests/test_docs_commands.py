"""Docs that cannot rot (issue 15): every command in README.md, benchmarks/README.md and docs/*.md is
collected; each Hydra command's overrides are parsed and composed against the real config as a shell
passes them (after quote removal, `shlex`); other commands must name a script, module or make target
that exists. Commands whose comment says "CPU-sized" run, at tiny size."""

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md", *REPO.glob("docs/*.md")])
# entry point -> (config folder, config name)
HYDRA = {
    "train.py": ("conf", "train"),
    "evaluate.py": ("conf", "evaluate"),
    "data_pipelines.extract_latents": ("conf", "extract_latents"),
    "data_pipelines.extract_text_embeddings": ("conf", "extract_text_embeddings"),
    "data_pipelines.fid_reference": ("conf/fid_reference", "fid_reference"),
}
PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>|\$")  # `data.root=...`, `<flow run>`, `$HEAD_NODE`
# A value the reader fills in (`sampler=NAME`, `model=my_backbone`): the grammar is checked, not the config.
READER_VALUE = re.compile(r"=([A-Z]+|my_\w+)$")
CPU_SIZED = "CPU-sized"
# Appended to a CPU-sized train.py command: a few steps of a depth-1 DiT, nothing written to outputs/.
TINY_TRAIN = [
    "model.depth=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "trainer=cpu",
    "trainer.max_steps=2",
    "logger=csv",
    "~callbacks.sample_grid",
    "~callbacks.progress",
    "trainer.enable_progress_bar=false",
    "threads=1",
]


def collect() -> list[tuple[str, str]]:
    """(where, command line) for every shell command in fenced bash blocks and every inline code
    span that starts a command."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        name = doc.relative_to(REPO).as_posix()
        for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    found.append((name, line.strip()))
        for span in re.findall(r"`([^`\n]+)`", text):
            if re.match(r"(python|make|torchrun|srun) ", span):
                found.append((name, span.replace("\\|", "|")))
    return found


COMMANDS = collect()


def entry_point(argv: list[str]) -> tuple[str | None, list[str]]:
    """(script or module, the arguments after it) of a python / torchrun / srun command line."""
    while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if argv and argv[0] == "srun":
        argv = argv[1:]
    if not argv or argv[0] not in ("python", "python3", "torchrun"):
        return None, argv
    rest = [a for a in argv[1:]]
    while rest and rest[0].startswith("-") and rest[0] != "-m":  # torchrun's own flags
        rest = rest[1:]
    if rest and rest[0] == "-m":
        return rest[1], rest[2:]
    return (rest[0], rest[1:]) if rest else (None, [])


def hydra_overrides(args: list[str]) -> list[str] | None:
    """The overrides a Hydra app receives, placeholders dropped, each sweep at its first value; None
    when the reader is to fill in a value."""
    args = [a for a in args if a not in ("-m", "--multirun") and not PLACEHOLDER.search(a)]
    parsed = OverridesParser.create().parse_overrides(args)  # the grammar errors users saw
    if any(READER_VALUE.search(a) for a in args):
        return None
    out = []
    for arg, override in zip(args, parsed, strict=True):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            out.append(f"{arg.split('=', 1)[0]}={first}")
        else:
            out.append(arg)
    return out


def test_commands_are_collected():
    assert len(COMMANDS) > 40
    assert any("data_pipelines.extract_latents" in c for _, c in COMMANDS)
    assert any(CPU_SIZED in c for _, c in COMMANDS)


def test_brace_urls_reach_the_config_whole():
    """docs/data.md's brace pattern, as the shell passes it, is one string value (it was a grammar
    error: `mismatched input '{'`)."""
    (line,) = [c for w, c in COMMANDS if w == "docs/data.md" and "data.urls=" in c and "pipe:" in c]
    script, args = entry_point(shlex.split(line, comments=True))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=hydra_overrides(args))
    assert cfg.data.urls == "pipe:aws s3 cp s3://bucket/in256/train-{000000..001281}.tar -"
    (line,) = [
        c for w, c in COMMANDS if w == "docs/data.md" and "data.urls=" in c and "https:" in c
    ]
    script, args = entry_point(shlex.split(line, comments=True))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=hydra_overrides(args))
    assert cfg.data.urls == "https://cdn.example.com/in256/train-{000000..001281}.tar"


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_documented_command_is_valid(where, line):
    argv = shlex.split(line, comments=True)
    if argv[:1] == ["make"]:
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert argv[1] in targets, f"{where}: `{line}`: no make target {argv[1]}"
        return
    script, args = entry_point(argv)
    if script is None:
        return  # printf, wandb sync, ...: not ours
    if script in HYDRA or script.endswith(tuple(HYDRA)):
        folder, name = HYDRA[next(k for k in HYDRA if script.endswith(k))]
        overrides = hydra_overrides(args)
        if overrides is None:
            return
        with initialize_config_dir(config_dir=str(REPO / folder), version_base="1.3"):
            compose(config_name=name, overrides=overrides, return_hydra_config=True)
    elif script.endswith(".py"):
        assert (REPO / script).is_file(), f"{where}: `{line}`: no script {script}"
    else:
        assert importlib.util.find_spec(script) is not None, f"{where}: no module {script}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "line"),
    [(w, c) for w, c in COMMANDS if CPU_SIZED in c],
    ids=lambda v: v if v.endswith(".md") else v[:50],
)
def test_cpu_sized_command_runs_at_tiny_size(where, line, tmp_path):
    argv = shlex.split(line, comments=True)
    script, args = entry_point(argv)
    extra = []
    if script == "train.py":
        extra = [*TINY_TRAIN, f"paths.output_dir={tmp_path}"]
    env = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, *(["-m", script] if not script.endswith(".py") else [script])]
    proc = subprocess.run(
        [*cmd, *args, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTHONPATH": f"{REPO / 'src'}:{REPO}"},
    )
    assert proc.returncode == 0, f"{where}: `{line}` failed:\n{proc.stderr[-3000:]}"
