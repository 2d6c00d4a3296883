"""Regenerate every published number: run each command whose output the README or docs/ cite,
then rewrite docs/claims.json, docs/results/ and docs/figures/ from those runs.

    python experiments/regenerate.py --out published          # `make results`
    python experiments/regenerate.py --out published --long   # + the runs too long for it
    python experiments/regenerate.py --out published --idiomem idiomem.jsonl   # + flag agreement
    python experiments/regenerate.py --out published --publish-only
    python experiments/regenerate.py --out published --steps ground-truth-gemma-3-270m   # one step, republished

Resumable at two levels: each `idiom-lens` command resumes its own stages, and each finished
step leaves `OUT/.steps/<name>.json` (its command, wall time, the commit) so a rerun skips it
while its command is unchanged. Each step's output goes to `OUT/logs/<name>.log`. The steps run
one after another: two heavy jobs at once on 2 cores slow each several times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Step:
    """One published run: `argv` (OUT written as `{out}`), the minutes it took on 2 cores, and
    whether it is too long for `make results` (`--long` adds it)."""

    name: str
    argv: tuple[str, ...]
    minutes: float
    long: bool = False

    def command(self, out: Path) -> list[str]:
        return [a.replace("{out}", str(out)) for a in self.argv]

    def shown(self) -> str:
        """The command as a reader types it (`idiom-lens`, `python`, OUT as `published`)."""
        return shlex.join(a.replace("{out}", "published") for a in self.argv)


def steps(*, idiomem: Path | None = None) -> list[Step]:
    # Minutes per step, alone on 2 cores. The recall steps: about 75 min per seed (knockouts 2 x 15,
    # tracing about 40, the rest about 8), seen on both models on 2026-12-07. Ground truth: 142 min
    # from an empty cache on a 2-core AMD EPYC, of which 24 trained the tuned lens (the study step's
    # here) and 51 the six implants (cached after the first run), 2026-12-07.
    """Every run the docs cite, in the order they run (the README's first)."""
    py = "python"
    found = [
        Step("study-gemma-3-270m", ("idiom-lens", "run", "--out", "{out}/study", "--model", "gemma-3-270m",
                                    "--lens", "tuned", "jacobian"), 45),
        Step("study-smollm2-135m", ("idiom-lens", "run", "--out", "{out}/study", "--model", "smollm2-135m",
                                    "--lens", "tuned", "jacobian"), 23),
        Step("compare", ("idiom-lens", "compare", "--results", "{out}/study"), 0.5),
        Step("report", ("idiom-lens", "report", "--results", "{out}/study"), 0.5),
        *(Step(f"lens-probe-kl-{m}", (py, "experiments/lens_probe_kl.py", "--model", m,
                                      "--out", f"{{out}}/lens-probe-kl-{m}", "--per-set", "100"), 18)
          for m in ("gemma-3-270m", "smollm2-135m")),
        Step("knockouts-gemma-3-270m", (py, "experiments/knockouts.py", "--out", "{out}/knockouts-gemma-3-270m",
                                        "--per-group", "50", "--k", "100", "--windows", "1", "--positions", "all",
                                        "--modes", "zero_top", "--no-skip", "--value-vector-k", "1",
                                        "--norms", "frozen", "live", "--ablations", "zero", "mean",
                                        "--rank-by", "effective", "magnitude"), 100),
        Step("attribution-patching", (py, "benchmarks/attribution_patching_bench.py", "--n", "20",
                                      "--out", "{out}/attribution-patching"), 3),
        Step("recall-gemma-3-270m", (py, "experiments/where_recall_lives.py", "--out", "{out}/recall-gemma-3-270m",
                                     "--per-set", "50", "--seeds", "0", "1", "--window", "5"), 150),
        Step("recall-smollm2-135m", (py, "experiments/where_recall_lives.py", "--model", "smollm2-135m",
                                     "--out", "{out}/recall-smollm2-135m", "--per-set", "50", "--seeds", "0", "1",
                                     "--window", "5"), 150),
        Step("ground-truth-gemma-3-270m", (py, "experiments/ground_truth.py",
                                           "--out", "{out}/ground-truth-gemma-3-270m"), 95),
        Step("ground-truth-neurons-gemma-3-270m",
             (py, "experiments/ground_truth.py", "--implant-mode", "neurons", "--neurons-only",
              "--out", "{out}/ground-truth-neurons-gemma-3-270m"), 90),
        Step("implant-scaling", (py, "benchmarks/implant_bench.py", "--dataset", "implanted", "--layers", "8",
                                 "--n-idioms", "25", "50", "100", "--out", "{out}/implant-scaling/scaling.jsonl"), 8),
        Step("knockouts-all-memorized", (py, "experiments/knockouts.py", "--out", "{out}/knockouts-all-memorized",
                                         "--dataset", "idioms", "--per-group", "0", "--whole", "memorized idioms",
                                         "--positions", "all", "--k", "100", "--windows", "1",
                                         "--controls", "matched", "--value-vector-k", "1", "--no-skip",
                                         "--norms", "frozen"), 90, long=True),
    ]
    if idiomem is not None:
        found.append(Step("flag-agreement", (py, "experiments/flag_agreement.py", str(idiomem), "--model",
                                             "gemma-3-270m", "--out", "{out}/flag-agreement/flags.csv"), 5))
    return found


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def run_step(step: Step, out: Path) -> float | None:
    """Run `step` unless its marker says it finished with this command; the wall seconds, or None."""
    marker = out / ".steps" / f"{step.name}.json"
    command = step.command(out)
    if marker.is_file() and json.loads(marker.read_text()).get("command") == command:
        print(f"[regenerate] {step.name}: done before ({marker}), skipped", flush=True)
        return None
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    executable = {"idiom-lens": [str(Path(sys.executable).with_name("idiom-lens"))], "python": [sys.executable]}
    argv = executable[command[0]] + command[1:]
    print(f"[regenerate] {step.name}: {step.shown()}  (about {step.minutes:g} min; log {log})", flush=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(argv, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"[regenerate] {step.name} failed (exit {done.returncode}) after {seconds:.0f} s; "
                         f"the end of {log}:\n{tail}")
    from idiom_lens.io import write_json

    write_json(marker, {"command": command, "shown": step.shown(), "seconds": round(seconds, 1),
                        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                        "commit": _commit()})
    print(f"[regenerate] {step.name}: {seconds:.0f} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("published"), help="where the runs write (default published)")
    parser.add_argument("--long", action="store_true", help="also the runs too long for `make results`")
    parser.add_argument("--idiomem", type=Path, default=None,
                        help="the authors' idiomem.jsonl: also the flag agreement of docs/datasets.md")
    parser.add_argument("--publish-only", action="store_true", help="only rewrite docs/ from the runs already in OUT")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="the docs folder to rewrite (default docs/)")
    parser.add_argument("--steps", nargs="+", default=None, metavar="STEP",
                        help="run and republish only these steps, keeping the rest of docs/ (publish.ALONE names "
                             "the steps that can be)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.steps is not None:
        from publish import publish_steps

        chosen = {step.name: step for step in steps(idiomem=args.idiomem)}
        unknown = [name for name in args.steps if name not in chosen]
        if unknown:
            raise SystemExit(f"[regenerate] --steps {unknown} are no steps: expected some of {sorted(chosen)}")
        if not args.publish_only:
            for name in args.steps:
                run_step(chosen[name], out)
        publish_steps(out, args.docs, names=args.steps, steps=steps(idiomem=args.idiomem))
        return 0
    if not args.publish_only:
        for step in steps(idiomem=args.idiomem):
            if step.long and not args.long:
                print(f"[regenerate] {step.name}: too long for `make results` (about {step.minutes:g} min); "
                      f"`make results-long` runs it: {step.shown()}", flush=True)
                continue
            run_step(step, out)
    from publish import publish  # experiments/publish.py: the docs from the runs

    publish(out, args.docs, steps=steps(idiomem=args.idiomem))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
