"""The pages teach from facts that cannot drift: every relative link and image of every Markdown file resolves, anchors
included; and every number the README and the docs/ pages quote from a result is bound to its own source.

A quoted number is bound by a comment on the line right after its block (a paragraph, a list or a table):

    <!-- numbers: SOURCE; SOURCE; ... -->

The block's decimal numbers, and its verdict words where a source is a verdict, must be exactly what the sources
give, in order, each at the precision the page prints. So a number swapped for another cell's fails, and so does an
unbound number. A SOURCE is one of:

    bench TABLE|ROW|COLUMN&COLUMN...   cells of benchmark/results/results.json (a table by its number, "Table 1a", a
    study TABLE|ROW|COLUMN&COLUMN...   row by its first cell, a column by its header; each a unique prefix will do),
                                       or of benchmark/study_results/results.json; a cell is its mean, then its std or
                                       its interval [low, high], as results.md shows it; CELL@mean picks one part,
                                       CELL@values its per-seed values
    study claim ID[@PART]              a verdict of the study: its mean [low, high]; @outcome its verdict (Holm's),
                                       @raw_outcome the uncorrected one, @holm its mean [Holm interval], @p its
                                       p-value, @axis1 and @axis2 the previous study's size axis, @mean, @low,
                                       @high one part
    summary RUN_FOLDER KEY             a key of a committed run's summary.json
    eval RUN_FOLDER VERSION            the gold reward of that version's evaluation in the run's metrics.jsonl
    'TEXT'                             a constant the page states, not a measurement (the study's margin, say)

Model sizes ("10.6 M") and versions ("0.32.0") are names, not quoted numbers.
"""

import glob
import json
import os
import re

import pytest

from conftest import ROOT

PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
RESULTS = {"bench": "benchmark/results/results.json", "study": "benchmark/study_results/results.json"}
# The sections whose every quoted number must be bound (a table that names its machine and date needs none).
RESULT_SECTIONS = {
    "README.md": ["The benchmark", "The off-policy study"],
    "docs/benchmark.md": ["Results", "The default runs"],
    "docs/study.md": ["Results"],
}
NUMBER = re.compile(r"(?<![\w.])[+-]?\d+\.\d+(?!\w|\.\d)(?! M\b)")
VERDICT = re.compile(r"\b(holds|reversed|undecided|not tested here)\b")
BINDING = re.compile(r"^<!-- numbers: (.*) -->$")


def markdown_files() -> list[str]:
    skip = (".venv", "runs", ".pytest_cache", ".cache", "node_modules")
    found = glob.glob(os.path.join(ROOT, "**", "*.md"), recursive=True)
    return sorted(os.path.relpath(p, ROOT) for p in found if not os.path.relpath(p, ROOT).startswith(skip))


def prose(text: str) -> str:
    """The text with its fenced code blocks, inline code and HTML comments blanked out (each character a space, so
    that positions stay): what a link or a quoted number could be in."""

    def blank(match) -> str:
        return re.sub(r"[^\n]", " ", match.group())

    text = re.sub(r"^```.*?^```", blank, text, flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", blank, text, flags=re.S)
    return re.sub(r"`[^`\n]*`", blank, text)


# ----------------------------------------------------------------------------------------------------
# Links.
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but - and _ removed, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", open(os.path.join(ROOT, path)).read(), flags=re.S | re.M)
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(path: str, text: str) -> list[str]:
    """The relative links and images of a Markdown file (at path, relative to the repository) that lead nowhere."""
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(os.path.join(ROOT, resolved)):
            broken.append(target)
        elif anchor and (not resolved.endswith(".md") or anchor not in anchors(resolved)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("path", markdown_files())
def test_every_relative_link_and_image_resolves(path):
    assert broken_links(path, open(os.path.join(ROOT, path)).read()) == []


def test_the_link_check_finds_a_broken_file_and_a_broken_anchor():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert broken_links("README.md", readme) == []
    assert broken_links("README.md", readme.replace("(docs/metrics.md)", "(docs/metric.md)", 1)) == ["docs/metric.md"]
    wrong_anchor = readme.replace("(#gpus-and-several-ranks)", "(#gpus-and-several-rank)", 1)
    assert broken_links("README.md", wrong_anchor) == ["#gpus-and-several-rank"]
    assert "the-papers-other-methods-and-settings" in anchors("docs/implementation_details.md")


# ----------------------------------------------------------------------------------------------------
# Numbers.
def unique(options: list, prefix: str, what: str):
    exact = [o for o in options if o == prefix]
    found = exact or [o for o in options if o.startswith(prefix)]
    assert len(found) == 1, f"{what} {prefix!r} matches {found}"
    return found[0]


def parts(entry) -> dict:
    """A cell of a results.json table (or a claim's test) as the numbers results.md shows: mean, then std or an
    interval."""
    if not isinstance(entry, dict):
        return {}
    if entry.get("low") is not None:
        return {"mean": entry["mean"], "low": entry["low"], "high": entry["high"]}
    return {"mean": entry["mean"]} | ({"std": entry["std"]} if entry.get("std") is not None else {})


def resolve(source: str) -> list[tuple[str, object]]:
    """A SOURCE (see the docstring) as the items the page must show: ("number", value) or ("verdict", word)."""
    source, _, part = source.strip().partition("@")
    if source.startswith("'"):
        return [("number", float(source.strip("'")))]
    kind, _, rest = source.partition(" ")
    if kind == "summary":
        folder, key = rest.split()
        return [("number", json.load(open(os.path.join(ROOT, folder, "summary.json")))[key])]
    if kind == "eval":
        folder, version = rest.split()
        rows = [json.loads(line) for line in open(os.path.join(ROOT, folder, "metrics.jsonl"))]
        (row,) = [r for r in rows if r.get("eval/version") == int(version)]
        return [("number", row["eval/gold_reward"])]
    results = json.load(open(os.path.join(ROOT, RESULTS[kind])))
    if rest.startswith("claim "):
        claim = {c["id"]: c for c in results["claims"]}[rest.removeprefix("claim ")]
        if part in ("outcome", "raw_outcome"):
            return [("verdict", claim[part])]
        if part == "holm":
            return [("number", v) for v in (claim["test"]["mean"], claim["holm"]["low"], claim["holm"]["high"])]
        if part == "p":
            return [("number", claim["test"]["p"])]
        entry = claim["axis"][int(part[-1]) - 1] if part.startswith("axis") else claim["test"]
        values = parts(entry)
        return [("number", values[part])] if part in values else [("number", v) for v in values.values()]
    title, row_key, columns = rest.split("|")
    titles = [t["title"] for t in results["tables"]]
    table = results["tables"][titles.index(unique(titles, title + ".", "table"))]
    row = {str(r[table["columns"][0]]): r for r in table["rows"]}
    row = row[unique(list(row), row_key, "row")]
    items = []
    for column in columns.split("&"):
        cell = row[unique(table["columns"], column, "column")]
        if part == "values":
            numbers = cell["values"]
        else:
            numbers = [parts(cell)[part]] if part else list(parts(cell).values())
        items += [("number", v) for v in numbers]
    return items


def shown(block: str, verdicts: bool, where: bool = False) -> list:
    """The decimal numbers of a block, and its verdict words if asked, in the order the page shows them: (kind, text),
    or with `where`, (start, end, kind, text)."""
    text = prose(block)
    found = [(m.start(), m.end(), "number", m.group()) for m in NUMBER.finditer(text)]
    found += [(m.start(), m.end(), "verdict", m.group()) for m in VERDICT.finditer(text)] if verdicts else []
    return sorted(found) if where else [(kind, value) for _, _, kind, value in sorted(found)]


def check_block(block: str, sources: list[str]):
    expected = [item for s in sources for item in resolve(s)]
    actual = shown(block, verdicts=any(kind == "verdict" for kind, _ in expected))
    assert len(actual) == len(expected), f"{len(actual)} quoted, {len(expected)} bound, in:\n{block}"
    for (kind, text), (want_kind, value) in zip(actual, expected):
        assert kind == want_kind, (text, value, block)
        if kind == "verdict":
            assert text == value, (text, value, block)
        else:  # equal at the precision printed
            decimals = len(text.split(".")[1])
            assert abs(float(text) - value) <= 0.5 * 10**-decimals + 1e-9, (text, value, block)


def blocks(text: str) -> list[tuple[str, list[str] | None]]:
    """Each block of a page (lines between blank lines, code fences whole), with its sources if a binding follows."""
    found, lines, fenced = [], [], False
    for line in text.splitlines() + [""]:
        if line.startswith("```"):
            fenced = not fenced
        binding = BINDING.match(line.strip())
        if binding and lines:
            found.append(("\n".join(lines), binding.group(1).split(";")))
            lines = []
        elif line.strip() or fenced:
            lines.append(line)
        elif lines:
            found.append(("\n".join(lines), None))
            lines = []
    return found


def sections(text: str) -> dict[str, str]:
    parts_ = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts_[1::2], parts_[2::2]))


@pytest.mark.parametrize("path", PAGES)
def test_every_bound_number_is_its_sources(path):
    bound = [(block, sources) for block, sources in blocks(open(os.path.join(ROOT, path)).read()) if sources]
    for block, sources in bound:
        check_block(block, sources)
    assert bound or path not in RESULT_SECTIONS


@pytest.mark.parametrize("path", sorted(RESULT_SECTIONS))
def test_every_number_of_a_results_section_is_bound(path):
    """A block of a results section with a decimal number in it carries a binding, unless it is a table that names
    the machine and date of its measurements."""
    page = sections(open(os.path.join(ROOT, path)).read())
    for name in RESULT_SECTIONS[path]:
        for block, sources in blocks(page[name]):
            names_its_machine = block.startswith("|") and "machine" in block.splitlines()[0]
            assert sources or names_its_machine or not shown(block, verdicts=False), f"{path}, {name}:\n{block}"


@pytest.mark.parametrize("path", PAGES)
def test_a_number_swapped_for_another_cells_fails_the_check(path):
    """Each bound table, with two of its quoted numbers swapped (or two of its verdicts), no longer passes."""
    tables = [(b, s) for b, s in blocks(open(os.path.join(ROOT, path)).read()) if s and b.startswith("|")]
    for block, sources in tables:
        items = shown(block, verdicts=True, where=True)
        pairs = [(x, y) for i, x in enumerate(items) for y in items[i + 1 :] if x[2] == y[2] and x[3] != y[3]]
        for a, b in pairs[:: max(1, len(pairs) // 5)]:  # a few swaps each, near and far
            swapped = block[: a[0]] + b[3] + block[a[1] : b[0]] + a[3] + block[b[1] :]
            with pytest.raises(AssertionError):
                check_block(swapped, sources)
    assert tables or path not in RESULT_SECTIONS
