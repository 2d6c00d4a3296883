"""Agreement of our flag rules with the authors' flags on their IdioMem file (Cohen's kappa).

    python experiments/flag_agreement.py PATH/TO/idiomem.jsonl
    python experiments/flag_agreement.py PATH/TO/idiomem.jsonl --model gemma-3-270m --out flags.csv

PATH is the authors' published IdioMem JSONL (repository adihaviv/idiomem, `idiomem.jsonl`; not
bundled). For every idiom, prompt = all words but the last, target = the last word; our four
flags are computed with the bundled rules (`idiom_lens.datasets.flags.flags`, needs the
`build-data` extra) and compared with the authors' values as published (their `hard_to_guess`
too, not the loader's single-target adjustment). With `--model`, `prompt_comp_ind` is also
computed with the model-based tail test (`idiom_lens.analyses.model_flags`), and `hard_to_guess`
from it. Prints one table: per flag and rule, kappa, observed agreement and the 2x2 counts
(authors x ours). `--out` writes the per-idiom flags as CSV.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the authors' idiomem.jsonl")
    parser.add_argument("--model", default=None, help="also run the model-based prompt_comp_ind (e.g. gemma-3-270m)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="per-idiom flags as CSV")
    args = parser.parse_args(argv)

    import pandas as pd

    from idiom_lens.datasets.agreement import agreement
    from idiom_lens.datasets.build import compositionality_ref
    from idiom_lens.datasets.flags import flags
    from idiom_lens.datasets.probes import Probe

    rows = [json.loads(line) for line in args.path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    names = ("similarity_ind", "prompt_comp_ind", "frequent_target_ind", "hard_to_guess")
    ref = compositionality_ref()
    table = []
    for i, row in enumerate(rows):
        prompt, target = " ".join(row["idiom"].split()).rsplit(" ", 1)
        ours = flags(prompt, target, ref)
        entry = {"line": i + 1, "idiom": row["idiom"], "prompt": prompt, "target": target}
        entry |= {f"authors_{n}": bool(row[n]) for n in names} | {f"ours_{n}": ours[n] for n in names}
        table.append(entry)
    frame = pd.DataFrame(table)
    rules = [(n, "lexical (bundled rules)", f"ours_{n}") for n in names]

    if args.model:
        from idiom_lens.analyses.model_flags import tail_prompt_comp
        from idiom_lens.models.loading import load_model

        model = load_model(args.model, device=args.device)
        probes = [Probe(id=str(r["line"]), prompt=r["prompt"], target=r["target"], kind="idiom") for r in table]
        comp = tail_prompt_comp(model, probes)
        frame["model_prompt_comp_ind"] = [comp[str(line)] for line in frame["line"]]
        frame["model_hard_to_guess"] = ~frame["model_prompt_comp_ind"] & ~frame["ours_similarity_ind"]
        rules += [
            ("prompt_comp_ind", f"model tail test ({model.spec})", "model_prompt_comp_ind"),
            ("hard_to_guess", f"with the model tail test ({model.spec})", "model_hard_to_guess"),
        ]

    print(f"{len(frame)} idioms from {args.path}\n")
    print("| flag | rule | kappa | agreement | authors True | ours True | both True | authors only | ours only "
          "| both False |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rule, column in rules:
        a = agreement(list(frame[f"authors_{name}"]), list(frame[column]))
        print(
            f"| {name} | {rule} | {a.kappa:.2f} | {a.observed:.1%} | {a.both_true + a.first_only} | "
            f"{a.both_true + a.second_only} | {a.both_true} | {a.first_only} | {a.second_only} | {a.both_false} |"
        )
    if args.out:
        frame.to_csv(args.out, index=False)
        print(f"\nper-idiom flags: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
