"""The documentation keeps its promises: README.md stays an overview, its benchmark
figures are the ones docs/benchmarks.md records, its links lead somewhere, and the
repository speaks only of itself (no numbers of issues of a tracker outside it)."""
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
DOCS = os.path.join(REPO, 'docs')
BENCHMARKS = os.path.join(DOCS, 'benchmarks.md')
THIS_FILE = os.path.abspath(__file__)

MAX_README_LINES = 250
SUMMARY_HEADING = '## Benchmarks'

# a figure with its unit: 6.02x, 1.06-1.44x, 83.57 %, 341.1 MiB, 5,132 images/s
FIGURE = re.compile(r'(?<![\w.,-])\d+(?:[.,]\d+)*(?:-\d+(?:[.,]\d+)*)?'
                    r'(?:x\b|\s?%|\s?(?:MiB|GiB|MB|GB|ms|images/s)\b)')
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
FENCE = re.compile(r'^(```|~~~).*?^\1[^\n]*$', re.MULTILINE | re.DOTALL)
ISSUE = re.compile(r'issue [0-9]', re.IGNORECASE)   # the pattern's own line: skipped below
TEXT_SUFFIXES = ('.py', '.md', '.txt', '.sh', '.cfg', '.ini', '.toml', '.json', '.yaml',
                 '.yml')


def read(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


def doc_files():
    """README.md and every Markdown file under docs/."""
    files = [README]
    for root, _, names in os.walk(DOCS):
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith('.md')]
    return files


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r'[`*_]', '', heading.strip().lower())
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def anchors(path):
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub does."""
    seen, result = {}, set()
    for line in FENCE.sub('', read(path)).splitlines():
        m = re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f'{base}-{n}')
    return result


def summary_rows():
    """The cells of the table under README.md's benchmark heading, header and rule left out."""
    lines = read(README).splitlines()
    assert SUMMARY_HEADING in lines, f'README.md has no "{SUMMARY_HEADING}" heading'
    rows = []
    for line in lines[lines.index(SUMMARY_HEADING) + 1:]:
        if line.startswith('#'):
            break
        if line.startswith('|'):
            rows.append([c.strip() for c in line.strip().strip('|').split('|')])
    assert len(rows) > 2, 'no table under the benchmark heading of README.md'
    assert set(''.join(rows[1])) <= set('-: '), 'the table has no header rule'
    return rows[2:]


def test_readme_is_an_overview():
    n = len(read(README).splitlines())
    assert n <= MAX_README_LINES, f'README.md has {n} lines (at most {MAX_README_LINES}): ' \
        'move details to docs/'


def test_readme_benchmark_figures_are_the_recorded_ones():
    """Every figure of README's summary table appears verbatim in docs/benchmarks.md."""
    recorded = read(BENCHMARKS)
    missing = []
    for row in summary_rows():
        figures = FIGURE.findall(' | '.join(row))
        assert figures, f'a summary row without a figure: {row}'
        missing += [(f, row[0]) for f in figures if f not in recorded]
    assert not missing, f'figures of README.md not in docs/benchmarks.md: {missing}'


@pytest.mark.parametrize('path', doc_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_lead_to_files_that_exist(path):
    broken = []
    for target in LINK.findall(FENCE.sub('', read(path))):
        if re.match(r'[a-z][a-z0-9+.-]*:', target, re.IGNORECASE):   # http:, mailto:, ...
            continue
        file_part, _, fragment = target.partition('#')
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) \
            if file_part else path
        if not os.path.exists(dest):
            broken.append(target)
        elif fragment and dest.endswith('.md') and fragment not in anchors(dest):
            broken.append(f'{target} (no such heading)')
    assert not broken, f'{os.path.relpath(path, REPO)}: broken links {broken}'


def test_no_issue_numbers():
    """README.md, docs/, code/, tools/ and tests/ name no issue by number."""
    paths = [README]
    for top in ('docs', 'code', 'tools', 'tests'):
        for root, dirs, names in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != '__pycache__' and not d.startswith('.')]
            paths += [os.path.join(root, n) for n in names if n.endswith(TEXT_SUFFIXES)]
    hits = []
    for path in paths:
        for number, line in enumerate(read(path).splitlines(), 1):
            if path == THIS_FILE and 'ISSUE = re.compile' in line:
                continue
            if ISSUE.search(line):
                hits.append(f'{os.path.relpath(path, REPO)}:{number}: {line.strip()}')
    assert not hits, 'issue numbers:\n' + '\n'.join(hits)


def test_docs_speak_of_the_project_only():
    """No tickets or trackers in README.md and docs/: the repository explains itself."""
    words = re.compile(r'\b(tickets?|tracker)\b', re.IGNORECASE)
    hits = [f'{os.path.relpath(p, REPO)}: {m.group(0)}'
            for p in doc_files() for m in words.finditer(read(p))]
    assert not hits, hits
