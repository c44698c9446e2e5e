"""The docs stay true to the repository: every relative link and image resolves (anchors against the target's
headings), every `distill-*` command and `make` target in a command block exists, every `group=choice` in a
command block names a config file of conf/, and the README stays a short manual (no clock times, no history).

Reads files only (no import of `distill`), so it runs in well under a second."""

from __future__ import annotations

import re
import tomllib
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
MANUAL = [README, *DOCS, ROOT / "benchmarks" / "README.md"]  # what the wording rules apply to
LINKED = [*MANUAL, ROOT / "CHANGELOG.md", *sorted((ROOT / "benchmarks" / "results").glob("*.md"))]
HELP = CONF / "hydra" / "help" / "train.yaml"

COMMAND_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
COMMAND = re.compile(r"(?<![\w./-])distill-[a-z][a-z0-9-]*")
MAKE = re.compile(r"(?<![\w./-])make\s+([a-z][\w-]*)")
OVERRIDE = re.compile(r"^\+{0,2}~?([A-Za-z_][\w/]*)=(.*)$")
CLOCK = re.compile(r"\b\d{1,2}:\d{2}\b")
HISTORY = ("this round", "last round", "previous round", "earlier run")
README_MAX_LINES = 260


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_fences(text: str) -> tuple[list[str], list[tuple[str, int, list[str]]]]:
    """(the lines outside fenced blocks, with each fenced line blanked; the blocks as (info, first line, lines))."""
    prose, blocks = [], []
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, body = (m.group(2)[0], len(m.group(2))), []
            blocks.append((m.group(3).lower(), n, body))
            prose.append("")
        elif fence is not None:
            closing = re.match(r"^\s*(`{3,}|~{3,})\s*$", line)
            if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= fence[1]:
                fence = None
            else:
                body.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = "".join(c for c in text if c.isalnum() or c in " -_" or unicodedata.category(c).startswith("M"))
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = HEADING.match(line)
        if m:
            s = slug(m.group(2))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image and reference definition outside code."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    out = []
    for n, line in enumerate(prose, 1):
        line = INLINE_CODE.sub("", line)
        out += [(n, m.group(1)) for m in LINK.finditer(line)]
        out += [(n, m.group(1)) for m in REF_LINK.finditer(line)]
    return out


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the commands in a file's command blocks: continuations joined, comments dropped."""
    _, blocks = split_fences(path.read_text(encoding="utf-8"))
    out = []
    for info, start, body in blocks:
        if info not in COMMAND_LANGS:
            continue
        joined, first = "", None
        for k, line in enumerate(body, start + 1):
            line = re.sub(r"(^|\s)#.*$", "", line)
            first = first or k
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            joined += line
            if joined.strip():
                out.append((first, joined))
            joined, first = "", None
        if joined.strip():
            out.append((first, joined))
    return out


def scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def missing_choices(command: str) -> list[str]:
    """The `group=choice` overrides of a command line whose group is a dir of conf/ but whose choice has no
    conf/<group>/<choice>.yaml (several choices: `divergence=fkl,rkl`, `experiment=[demo,teacher]`)."""
    bad = []
    for token in command.split():
        m = OVERRIDE.match(token.strip("'\""))
        if not m or not (CONF / m.group(1)).is_dir():
            continue
        group, value = m.group(1), m.group(2).strip("'\"")
        value = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        for choice in value.split(","):
            choice = choice.strip()
            if not choice or choice == "null" or re.search(r"[<>${}*]|\.\.\.", choice):
                continue  # a placeholder (<pair>, $X, ...) or no choice at all
            if not (CONF / group / f"{choice}.yaml").is_file():
                bad.append(f"{group}={choice}")
    return bad


@pytest.mark.parametrize("path", LINKED, ids=rel)
def test_every_relative_link_and_image_resolves(path):
    assert path.is_file(), f"{rel(path)} is missing"
    bad = []
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:|^//", target, re.I):
            continue  # https:, mailto:, ...: not a file of this repository
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{rel(path)}:{n}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            bad.append(f"{rel(path)}:{n}: {target} (no heading '#{anchor}' in {rel(dest)})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", MANUAL, ids=rel)
def test_commands_in_command_blocks_exist(path):
    known, targets = scripts(), make_targets()
    bad = []
    for n, line in command_lines(path):
        bad += [f"{rel(path)}:{n}: {c} is not in pyproject.toml [project.scripts]"
                for c in COMMAND.findall(line) if c not in known]
        bad += [f"{rel(path)}:{n}: make {t} is not a Makefile target" for t in MAKE.findall(line) if t not in targets]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", MANUAL, ids=rel)
def test_config_choices_in_command_blocks_exist(path):
    bad = [f"{rel(path)}:{n}: {c} has no conf/{c.replace('=', '/')}.yaml"
           for n, line in command_lines(path) for c in missing_choices(line)]
    assert not bad, "\n".join(bad)


def test_the_choice_check_reads_several_choices_and_skips_placeholders():
    assert missing_choices("distill-train -m divergence=fkl,rkl +sweep=demo hydra/launcher=slurm") == []
    assert missing_choices("distill-train recipe=gpt2-xl_gpt2/distill experiment=[demo,teacher] model=<pair>") == []
    assert missing_choices("distill-train divergence=fkl,nope 'rollout=on_policy' data.dir=/x tau=1,2") == \
        ["divergence=nope"]
    assert missing_choices("distill-train hydra/launcher=nope") == ["hydra/launcher=nope"]


def test_the_link_check_reads_links_and_github_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `code` title: (x)\n\n```bash\n[not](a/link)\n```\n"
                    "See [it](other.md#sub-head) and ![img](pic.png) but not `[code](x)`.\n")
    assert links(page) == [(6, "other.md#sub-head"), (6, "pic.png")]
    assert anchors(page) == {"a-code-title-x"}
    assert slug("The teacher at real scale (`bench_teacher_scale.py`)") == \
        "the-teacher-at-real-scale-bench_teacher_scalepy"


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/ (at most {README_MAX_LINES})"


def test_readme_has_no_clock_time_outside_code():
    prose, _ = split_fences(README.read_text(encoding="utf-8"))
    bad = [f"README.md:{n}: {line.strip()}" for n, line in enumerate(prose, 1) if CLOCK.search(line)]
    assert not bad, "timings name their machine and date in a footer, not a clock time:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", MANUAL, ids=rel)
def test_no_development_history_in_the_manual(path):
    text = path.read_text(encoding="utf-8").lower()
    bad = [f"{rel(path)}:{text[:text.index(w)].count(chr(10)) + 1}: {w!r}" for w in HISTORY if w in text]
    assert not bad, "the manual says what is, not when it changed (CHANGELOG.md):\n" + "\n".join(bad)


def test_the_index_links_every_docs_page():
    index = ROOT / "docs" / "index.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index)}
    missing = [rel(p) for p in DOCS if p != index and p.resolve() not in linked]
    assert not missing, f"docs/index.md does not link: {', '.join(missing)}"


def test_the_readme_keeps_the_two_commands_of_the_makefile():
    commands = [line.split("#")[0].strip() for _, line in command_lines(README)]
    assert "make demo" in commands and "make test" in commands
    assert {"demo", "test"} <= make_targets()


def test_the_train_help_template_uses_hydra_variables_and_valid_examples():
    cfg = yaml.safe_load(HELP.read_text())
    assert cfg["app_name"] == "distill-train"
    assert "$APP_CONFIG_GROUPS" in cfg["template"]
    assert "${hydra.help.header}" in cfg["template"] and "${hydra.help.footer}" in cfg["template"]
    # string.Template: any other `$name` would make Hydra's substitute() fail
    dollars = set(re.findall(r"\$(?!\{)(\w+)", cfg["template"] + cfg["header"] + cfg["footer"]))
    assert dollars <= {"APP_CONFIG_GROUPS", "HYDRA_CONFIG_GROUPS", "FLAGS_HELP", "CONFIG"}, dollars
    examples = [ln.strip() for ln in cfg["header"].splitlines() if ln.strip().startswith("distill-train")]
    assert len(examples) == 3
    assert [c for ex in examples for c in missing_choices(ex)] == []


# Our own paths (the anchors' repos have scripts/<model>/... of their own, which the docs cite too).
CODE_PATH = re.compile(r"(?<![\w/.-])(?:(?:distill|tests|benchmarks|conf)/[\w/.-]*\w|scripts/[\w.-]+\.(?:py|sh))")
DOTTED = re.compile(r"(?<![\w.])distill(?:\.[A-Za-z_]\w*)+")


def _top_level_names(path: Path) -> set[str]:
    """Names a module defines at top level (functions, classes, assignments, imports), read with ast."""
    import ast

    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def dotted_name_exists(name: str) -> bool:
    """`distill.a.b[.attr[.attr]]`: a module or package of the repo, then attributes defined in it."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[i:]
            return not rest or rest[0] in _top_level_names(module)
    return False


@pytest.mark.parametrize("path", LINKED, ids=rel)
def test_code_paths_and_module_names_in_the_docs_exist(path):
    """The manual names files and modules of the code: each still exists where the text says."""
    text = path.read_text()
    missing = sorted({m.group(0) for m in CODE_PATH.finditer(text) if not any(ch in m.group(0) for ch in "*<{")
                      and not (ROOT / m.group(0)).exists()})
    missing += sorted({m.group(0) for m in DOTTED.finditer(text) if not dotted_name_exists(m.group(0))})
    assert not missing, f"{rel(path)} names what is not there: {missing}"


def test_the_name_check_tells_real_names_from_stale_ones():
    assert dotted_name_exists("distill.config.compose") and dotted_name_exists("distill.cell.identity")
    assert not dotted_name_exists("distill.train.validate") and not dotted_name_exists("distill.runs")
