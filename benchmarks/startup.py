r"""What the plugin's start-up hook costs a Python process that never uses sbi.

Installing the plugin adds `sbi_fm_plugin_autoload.pth` to site-packages, which the
interpreter runs at start-up. This script times `site.main()`, the part of start-up
that reads `.pth` files, in fresh interpreters started with `-S`, once as installed
and once with the plugin's `.pth` file skipped, interleaved; it also reads the
hook's own line of `python -X importtime -c pass`, and checks that start-up imports
neither torch nor sbi.

    python -m benchmarks.startup [--runs 40]
"""

import argparse
import re
import statistics
import subprocess
import sys

PTH = "sbi_fm_plugin_autoload.pth"

TIME_SITE = """
import sys, time
skip, pth = sys.argv[1] == "skip", sys.argv[2]
import site
if skip:
    add = site.addpackage
    def addpackage(sitedir, name, known_paths):
        return known_paths if name == pth else add(sitedir, name, known_paths)
    site.addpackage = addpackage
start = time.perf_counter()
site.main()
elapsed = time.perf_counter() - start
assert not {"torch", "sbi", "sbi_fm_plugin"} & set(sys.modules), sorted(sys.modules)
print(elapsed)
"""


def _site_time(mode: str) -> float:
    result = subprocess.run(
        [sys.executable, "-S", "-c", TIME_SITE, mode, PTH],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(result.stdout)


def _hook_import_time() -> float | None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        check=True,
        capture_output=True,
        text=True,
    )
    match = re.search(
        r"\|\s*(\d+) \|\s*_sbi_fm_plugin_autoload$", result.stderr, re.MULTILINE
    )
    return None if match is None else int(match.group(1)) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    runs = parser.parse_args().runs

    with_hook, without_hook, hook = [], [], []
    for _ in range(runs):
        with_hook.append(_site_time("keep"))
        without_hook.append(_site_time("skip"))
        hook.append(_hook_import_time())
    if None in hook:
        sys.exit(f"{PTH} is not installed in this environment.")
    differences = [a - b for a, b in zip(with_hook, without_hook, strict=True)]

    def ms(values: list[float]) -> str:
        return f"{1e3 * statistics.median(values):.2f}"

    print(f"median of {runs} interleaved runs, milliseconds")
    print("| site.main() with hook | without | difference | hook import (importtime) |")
    print("|---:|---:|---:|---:|")
    print(f"| {ms(with_hook)} | {ms(without_hook)} | {ms(differences)} | {ms(hook)} |")


if __name__ == "__main__":
    main()
