#!/usr/bin/python3
"""tests/docs/check.py - the documentation cannot drift from the binary or from itself.

Run by tests/deploy/check (the deploy stage of scripts/test) and by
`meson test -C build --suite docs`. Checks, over README.md and every other *.md file of the
repository (docs/, deploy/README.md, ...):

  1. links: every relative link resolves to a file or folder of the repository, and every
     #anchor (same file or another .md file) to a heading there, with GitHub's anchors
     (lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats);
  2. settings: the table in docs/configuration.md has one row per setting of `outboxd --help`,
     in the same order, each with its environment variable and the binary's default ("required"
     and "none" included), and nothing else;
  3. commands: every `outboxd ...` command in a ```sh block (also `build/outboxd`, and
     `docker|podman run|exec ... outboxd SUBCOMMAND`) names a subcommand the binary has and only
     options that subcommand takes (its own, from the usage lines of --help, and the settings),
     with a value where the option needs one; `...` stands for "the usual settings";
  4. the man page: scripts/manpage, run on the binary, carries every setting with the meaning
     docs/configuration.md gives it, and names every guide in docs/ under SEE ALSO;
  5. word for word: what the integration tests run as the guides' text (the consumer recipe's
     table in tests/integration/test_consumers.py, the relay's NATS permissions in
     test_security.py) is in the guide that shows it; README.md opens with the two commands,
     scripts/demo first (tests/integration/test_demo.py runs it).

Prints one line per check: "PASS name" or "FAIL name: why". Exit 0 unless a check failed.
Usage: check.py --bin OUTBOXD
"""
import argparse
import ast
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG_DOC = REPO / "docs" / "configuration.md"

failed = 0


def report(ok, name, problems=()):
    global failed
    if ok:
        print(f"PASS {name}", flush=True)
        return
    failed += 1
    print(f"FAIL {name}: " + "; ".join(problems)[:1500], flush=True)


# ---- Markdown ----------------------------------------------------------------------------------

def markdown_files():
    """Every *.md file of the repository outside hidden folders and build trees."""
    files = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (Path(dirpath, d) / "meson-private").is_dir()
                             and d not in ("node_modules", "subprojects"))
        files += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(".md")]
    return files


FENCE = re.compile(r"^\s*(```|~~~)(.*)$")


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for n, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif line.strip().startswith(fence):
                fence = None
            continue
        if fence is None:
            yield n, line


def code_blocks(text):
    """(language, first line number, [lines]) of each fenced block."""
    blocks, fence, lang, start, body = [], None, "", 0, []
    for n, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if m and fence is None:
            fence, lang, start, body = m.group(1), m.group(2).strip(), n + 1, []
        elif m and line.strip().startswith(fence):
            blocks.append((lang, start, body))
            fence = None
        elif fence is not None:
            body.append(line)
    return blocks


def slug(heading):
    """GitHub's anchor for a heading's text."""
    h = re.sub(r"`([^`]*)`", r"\1", heading)
    h = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", h)
    h = h.strip().lower()
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def anchors(path, cache={}):
    if path not in cache:
        seen, result = {}, set()
        for _, line in prose_lines(path.read_text()):
            m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
            if not m:
                continue
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            result.add(s if n == 0 else f"{s}-{n}")
        cache[path] = result
    return cache[path]


def strip_code_spans(line):
    return re.sub(r"(`+)(.+?)\1", "", line)


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s>]*(?:\([^()]*\)[^()\s>]*)*)>?(?:\s+\"[^\"]*\")?\s*\)")


def check_links(files):
    problems, count = [], 0
    for f in files:
        rel = f.relative_to(REPO)
        for n, line in prose_lines(f.read_text()):
            for m in LINK.finditer(strip_code_spans(line)):
                target = m.group(1)
                count += 1
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
                    continue
                path_part, _, anchor = target.partition("#")
                dest = (f.parent / path_part).resolve() if path_part else f
                try:
                    dest.relative_to(REPO)
                except ValueError:
                    problems.append(f"{rel}:{n}: {target} leaves the repository")
                    continue
                if not dest.exists():
                    problems.append(f"{rel}:{n}: {target}: no such file")
                    continue
                if anchor:
                    if dest.suffix != ".md" or dest.is_dir():
                        problems.append(f"{rel}:{n}: {target}: an anchor into a file that is not Markdown")
                    elif anchor not in anchors(dest):
                        problems.append(f"{rel}:{n}: {target}: no heading with that anchor in "
                                        f"{dest.relative_to(REPO)}")
    report(not problems, f"docs: {count} links in {len(files)} Markdown files resolve "
                         "(files and #anchors)", problems)


# ---- the binary --------------------------------------------------------------------------------

def help_text(binary):
    return subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout


def parse_settings(text):
    """[(flag, env, default, takes_value, description)] in --help order; default is None for
    "no default" and "required" for a required setting."""
    lines = text.splitlines()
    start = next(k for k, l in enumerate(lines) if l.startswith("Settings"))
    settings = []
    for k in range(start + 1, len(lines)):
        m = re.match(r"^  (--[a-z][a-z0-9-]*)(\[=[A-Z]+\])?( [A-Z][A-Z:_|]*)?\s{2,}(.*)$", lines[k])
        if not m:
            continue
        env = re.match(r"^\s+env: (\S+)", lines[k + 1])
        desc = m.group(4)
        d = re.search(r"(?:\(|; )default: (.*)\)\s*$", desc)
        if d:
            default = d.group(1)
        elif desc.endswith("(required)"):
            default = "required"
        else:
            default = None
        desc = re.sub(r"\s*\((?:required|no default|(?:one of [^;]*; )?default: .*)\)\s*$", "", desc)
        settings.append((m.group(1), env.group(1) if env else None, default,
                         bool(m.group(3)), desc))
    return settings


def parse_commands(text):
    """{("slot", "list"): {"--json": False, ...}, ("status",): {...}, ...}: each subcommand's own
    options and whether each takes a value, from the usage lines of --help."""
    lines = text.splitlines()
    usage = lines[lines.index("Usage:") + 1:next(k for k, l in enumerate(lines) if l.startswith("Settings"))]
    desc_col = max(len(l) - len(l.lstrip()) for l in usage if l.strip())
    synopses = []
    for line in usage:
        indent = len(line) - len(line.lstrip())
        if line.startswith("  outboxd "):
            synopses.append(re.split(r"\s{3,}", line.strip())[0])
        elif line.strip() and indent < desc_col:
            synopses[-1] += " " + line.strip()
    commands = {}
    for s in synopses:
        words = s.split()[1:]
        if not words or words[0].startswith("--"):
            continue                          # outboxd --help, outboxd --version
        name = (words[0].strip("[]"),)            # "[run]": the default command
        if len(words) > 1 and re.match(r"^[a-z]+$", words[1]):
            name += (words[1],)                    # "slot list"
        opts = {}
        for m in re.finditer(r"(--[a-z][a-z0-9-]*)( [A-Z][A-Z|]*)?", s):
            opts[m.group(1)] = bool(m.group(2))
        commands[name] = opts
    if ("run",) in commands:                  # "outboxd [run] [settings]"
        commands[()] = commands[("run",)]
    return commands


# ---- 2. the settings table -----------------------------------------------------------------------

def table_rows(text, header):
    """Rows (lists of cells) of the first Markdown table whose header cells are `header`."""
    rows, inside = [], False
    for line in text.split("\n"):
        if not line.startswith("|"):
            if inside:
                break
            continue
        cells = split_row(line)
        if not inside:
            inside = [c.lower() for c in cells] == header
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        rows.append(cells)
    return rows


def split_row(line):
    cells, cur, code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
    cells.append(cur.strip())
    return cells


def doc_settings():
    return table_rows(CONFIG_DOC.read_text(), ["flag", "environment", "default", "meaning"])


def check_settings_table(settings):
    rows = doc_settings()
    problems = []
    doc_flags = []
    for flag, env, default, meaning in rows:
        m = re.fullmatch(r"`(--[a-z0-9-]+)`", flag)
        if not m:
            problems.append(f"flag cell {flag!r}: want one `--flag` per row")
            continue
        doc_flags.append((m.group(1), env, default, meaning))
    binary = {s[0]: s for s in settings}
    documented = [f for f, *_ in doc_flags]
    for f in binary:
        if f not in documented:
            problems.append(f"{f} is missing")
    for f in documented:
        if f not in binary:
            problems.append(f"{f} is not a setting of the binary")
        elif documented.count(f) > 1:
            problems.append(f"{f} appears {documented.count(f)} times")
    common = [f for f in documented if f in binary]
    if common != [f for f in binary if f in documented]:
        problems.append("the rows are not in the order of `outboxd --help`")
    for f, env, default, meaning in doc_flags:
        if f not in binary:
            continue
        _, want_env, want_default, _, _ = binary[f]
        if env != f"`{want_env}`":
            problems.append(f"{f}: environment {env}, the binary reads {want_env}")
        if want_default is None:
            ok = default == "none" or default.startswith("from ")
            want = "none"
        elif want_default == "required":
            ok = default == "required"
            want = "required"
        else:
            first = re.match(r"`([^`]*)`", default)
            ok = bool(first) and first.group(1) == want_default
            want = f"`{want_default}`"
        if not ok:
            problems.append(f"{f}: default {default}, the binary says {want}")
        if not meaning.strip():
            problems.append(f"{f}: no meaning")
    report(not problems, f"docs/configuration.md: {len(doc_flags)} settings, each as `outboxd --help` "
                         "names it (flag, environment variable, default, order)", problems)


# ---- 3. commands in ```sh blocks ---------------------------------------------------------------

SUBCOMMAND_WORD = re.compile(r"^[a-z][a-z-]*$")


def lint_invocation(words, commands, settings, where):
    """words follow `outboxd`; returns problems."""
    problems = []
    tops = {name[0] for name in commands if name}
    i, name = 0, ()
    if i < len(words) and not words[i].startswith("-") and words[i] != "...":
        if words[i] not in tops:
            return [f"{where}: unknown subcommand {words[i]!r}"]
        name = (words[i],)
        i += 1
        subs = {n[1] for n in commands if len(n) == 2 and n[0] == name[0]}
        if subs:
            if i >= len(words) or words[i] not in subs:
                got = words[i] if i < len(words) else "nothing"
                return [f"{where}: `outboxd {name[0]}` takes one of {sorted(subs)}, not {got!r}"]
            name += (words[i],)
            i += 1
    if name not in commands:
        return [f"{where}: unknown command {' '.join(name)!r}"]
    allowed = dict(commands[name])
    allowed.update({s[0]: s[3] for s in settings})
    allowed.update({"--help": False, "--version": False})
    while i < len(words):
        w = words[i]
        i += 1
        if w == "...":
            continue
        if not w.startswith("--"):
            problems.append(f"{where}: unexpected argument {w!r} to `outboxd {' '.join(name) or 'run'}`")
            continue
        flag, eq, _ = w.partition("=")
        if flag not in allowed:
            problems.append(f"{where}: `outboxd {' '.join(name) or 'run'}` has no option {flag}")
            continue
        if allowed[flag] and not eq:
            if i >= len(words) or words[i].startswith("--"):
                problems.append(f"{where}: {flag} needs a value")
            else:
                i += 1
    return problems


def shell_commands(lines):
    """Logical lines of a shell block: continuations joined, each split into commands (lists of
    words) at |, &&, ||, ; and &."""
    joined, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
        else:
            joined.append(cur + line)
            cur = ""
    if cur:
        joined.append(cur)
    for line in joined:
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        try:
            tokens = list(lex)
        except ValueError:
            continue                          # output lines with unbalanced quotes
        cmd = []
        for t in tokens:
            if t and set(t) <= set(";&|"):
                if cmd:
                    yield line, cmd
                cmd = []
            else:
                cmd.append(t)
        if cmd:
            yield line, cmd


def is_outboxd(word):
    return word == "outboxd" or word.endswith("/outboxd")


def check_commands(files, commands, settings):
    problems, count = [], 0
    tops = {name[0] for name in commands if name}
    for f in files:
        rel = f.relative_to(REPO)
        for lang, start, body in code_blocks(f.read_text()):
            if lang not in ("sh", "bash", "shell", "console"):
                continue
            for line, cmd in shell_commands(body):
                where = f"{rel}, block at line {start}: {line.strip()[:60]}"
                words = list(cmd)
                while words and (words[0] == "$" or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])):
                    words.pop(0)
                if not words:
                    continue
                if is_outboxd(words[0]):
                    count += 1
                    problems += lint_invocation(words[1:], commands, settings, where)
                elif words[0] in ("docker", "podman") and len(words) > 1 and words[1] in ("run", "exec"):
                    # the image (run) or container (exec), then outboxd's own arguments
                    for k in range(2, len(words) - 1):
                        if words[k] != "outboxd" or words[k - 1] in ("--name", "-t", "--tag"):
                            continue
                        nxt = words[k + 1]
                        if nxt == "outboxd":
                            continue
                        if nxt.startswith("-") or nxt in tops:
                            count += 1
                            problems += lint_invocation(words[k + 1:], commands, settings, where)
                        break
    report(not problems and count > 0,
           f"docs: {count} `outboxd ...` commands in sh blocks use subcommands and options the binary has",
           problems or ["no commands found"])


# ---- 4. the man page ---------------------------------------------------------------------------

def check_manpage(binary, settings):
    guides = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "outboxd.1"
        r = subprocess.run([sys.executable, str(REPO / "scripts" / "manpage"), binary, str(out),
                            str(CONFIG_DOC)], capture_output=True, text=True)
        if r.returncode != 0:
            report(False, "scripts/manpage", [r.stderr.strip()])
            return
        page = out.read_text()
    problems = []
    plain = re.sub(r"\\f[BIR]", "", page).replace("\\-", "-").replace("\\e", "\\")
    plain = " ".join(plain.split())
    meanings = {}
    for flag, _, _, meaning in doc_settings():
        m = re.fullmatch(r"`(--[a-z0-9-]+)`", flag)
        if m:
            meanings[m.group(1)] = meaning
    for flag, env, *_ in settings:
        if f".B {flag}".replace("-", "\\-") not in page:
            problems.append(f"{flag} missing")
            continue
        words = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", meanings.get(flag, ""))
        words = " ".join(words.replace("`", "").replace("**", "").split())
        if words and words not in plain:
            problems.append(f"{flag}: not the meaning docs/configuration.md gives")
    see_also = page.split(".SH SEE ALSO", 1)[-1]
    for g in guides:
        if g not in see_also:
            problems.append(f"SEE ALSO does not name docs/{g}")
    report(not problems, f"outboxd(1): {len(settings)} settings with docs/configuration.md's meanings; "
                         f"SEE ALSO names the {len(guides)} guides", problems)


# ---- 5. text the tests run, word for word ------------------------------------------------------

WORD_FOR_WORD = [  # (test file, constant, guide)
    ("tests/integration/test_consumers.py", "RECIPE_TABLE", "docs/consumers.md"),
    ("tests/integration/test_security.py", "RELAY_PERMISSIONS", "docs/security.md"),
]


def check_word_for_word():
    problems = []
    for test, name, guide in WORD_FOR_WORD:
        tree = ast.parse((REPO / test).read_text())
        value = next((n.value.value for n in tree.body if isinstance(n, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)
                      and isinstance(n.value, ast.Constant)), None)
        if value is None:
            problems.append(f"{test} has no string {name}")
        elif value.strip() not in (REPO / guide).read_text():
            problems.append(f"{guide} does not show {test}'s {name} word for word")
    readme = (REPO / "README.md").read_text().split("\n")
    if not (readme[0] == "# outboxd" and readme[2] == "```sh" and readme[3].startswith("scripts/demo ")
            and readme[4].startswith("scripts/test ") and readme[5] == "```"):
        problems.append("README.md does not open with scripts/demo and scripts/test")
    report(not problems, "docs: README.md opens with scripts/demo and scripts/test; the text the integration tests run (" +
           ", ".join(f"{n} in {g}" for _, n, g in WORD_FOR_WORD) + ") is in the guides word for word",
           problems)


# The relay's rooms, bottom first (src/run.c says why): each may call only the rooms below it.
LAYERS = ["src/relay.c", "src/backfill.c", "src/session.c", "src/run.c"]
DEFINITION = re.compile(r"^(?!static\b)[A-Za-z_][\w \*]*?\b([a-z_][a-z0-9_]*)\(", re.M)


def check_layers():
    """No room of the relay calls a function a room above it defines: run -> session ->
    backfill -> relay call down only."""
    problems = []
    defined = {}
    for path in LAYERS:
        text = (REPO / path).read_text()
        defined[path] = {m.group(1) for m in DEFINITION.finditer(text)
                         if not m.group(0).startswith(("return", "if", "while", "for", "switch"))}
    for i, lower in enumerate(LAYERS):
        text = re.sub(r"/\*.*?\*/", "", (REPO / lower).read_text(), flags=re.S)
        for higher in LAYERS[i + 1:]:
            for name in sorted(defined[higher]):
                if re.search(rf"\b{name}\(", text):
                    problems.append(f"{lower} calls {name}(), which {higher} defines (a room above it)")
    report(not problems, "layers: " + " -> ".join(reversed([p.split("/")[-1] for p in LAYERS])) +
           " call down only", problems)


def check_bench_layers():
    """The modules of scripts/benchlib import only the modules listed before them in its
    LAYERS (scripts/benchlib/__init__.py), and LAYERS lists every module, in the order its
    docstring gives."""
    pkg = REPO / "scripts" / "benchlib"
    init = ast.parse((pkg / "__init__.py").read_text())
    layers = next(ast.literal_eval(n.value) for n in init.body if isinstance(n, ast.Assign)
                  and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["LAYERS"])
    problems = []
    files = sorted(p.stem for p in pkg.glob("*.py") if p.stem != "__init__")
    if sorted(layers) != files:
        problems.append(f"LAYERS {layers} and the modules {files} differ")
    listed = re.findall(r"^  ([a-z]+) +\S", ast.get_docstring(init), re.M)
    if listed != layers:
        problems.append(f"the docstring lists {listed}, LAYERS {layers}")
    for i, name in enumerate(layers):
        path = pkg / f"{name}.py"
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for target in [node.module] if node.module else [a.name for a in node.names]:
                    if target not in layers[:i]:
                        problems.append(f"benchlib/{name}.py imports .{target}, not below it in LAYERS")
    report(not problems, "layers: scripts/benchlib " + " -> ".join(reversed(layers)) + " import down only",
           problems)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    args = ap.parse_args()
    files = markdown_files()
    check_links(files)
    text = help_text(args.bin)
    settings = parse_settings(text)
    commands = parse_commands(text)
    check_settings_table(settings)
    check_commands(files, commands, settings)
    check_manpage(args.bin, settings)
    check_word_for_word()
    check_layers()
    check_bench_layers()
    print(f"{'all docs checks passed' if not failed else f'{failed} docs checks failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
