"""``dinomed recipes [--kind finetune|pretrain] [--json]``: the bundled finetuning recipes and pretraining stages."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "recipes",
        help="list the bundled finetuning recipes and pretraining stage configs, with a one-line description",
        description="List every bundled config that dinomed finetune and dinomed pretrain accept by name, with its "
        "one-line description (the YAML's description: key). --json prints one JSON list (name, kind, description, "
        "path, model, inputs, modality, stage, arch, family, checkpoint_keys, option_keys) for front-ends.",
    )
    p.add_argument("--kind", choices=("finetune", "pretrain"), default=None, help="only this kind of recipe")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--events", action="store_true", help="one done event whose 'recipes' field holds the JSON list")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..recipes import list_recipes

    recipes = list_recipes(args.kind)
    if args.events:
        from ..events import EventWriter

        EventWriter(enabled=True).done(recipes=[r.as_dict() for r in recipes])
        return 0
    if args.json:
        print(json.dumps([r.as_dict() for r in recipes], indent=1))
        return 0
    width = max(len(r.name) for r in recipes)
    for kind in ("finetune", "pretrain"):
        chosen = [r for r in recipes if r.kind == kind]
        if not chosen:
            continue
        print(f"{kind} (dinomed {kind} NAME …):")
        for r in chosen:
            print(f"  {r.name:<{width}}  {r.description}")
    return 0
