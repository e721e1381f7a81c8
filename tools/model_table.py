"""Print the README's model table from the registry (meta-device builds, no weights).

    python tools/model_table.py > /tmp/table.md
"""
import collections

import featurezoo as fz


def main() -> None:
    families = collections.defaultdict(list)
    for name in fz.list_models():
        if fz.model_entrypoint(name).__module__.startswith("featurezoo.models."):
            families[fz.registry.model_module(name)].append(name)
    print("| family | models | feature levels (entries) | reductions of the pyramid | timm twins |")
    print("|---|---|---|---|---|")
    total = 0
    for family, names in sorted(families.items()):
        total += len(names)
        infos = [fz.get_feature_info(n) for n in names]
        levels = sorted({len(i) for i in infos})
        pyramids = sorted({tuple(sorted(set(i.reduction()))) for i in infos})
        twins = sum(1 for n in names if fz.get_model_cfg(n).timm_twin)
        print(f"| {family} | {', '.join(names)} | {'/'.join(map(str, levels))} | "
              f"{'; '.join(' '.join(map(str, p)) for p in pyramids)} | {twins or ''} |")
    print(f"\n{total} models in {len(families)} families, all with `features_only`.")


if __name__ == "__main__":
    main()
