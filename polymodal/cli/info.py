"""`polymodal info`: the registered kinds, or a table of a model's parts."""

from __future__ import annotations

import argparse

from polymodal.errors import UserError


def add_parser(commands) -> None:
    parser = commands.add_parser("info", help="list component kinds, or describe a model's parts",
                                 description="List registered kinds (--list) or describe a recipe, "
                                             "saved model or LLM source.")
    parser.add_argument("model", nargs="?", help="a recipe YAML, a saved model directory or an LLM source")
    parser.add_argument("--list", action="store_true", help="list the registered kinds of each part")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. model.connector.depth=3")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(kinds_table())
        return 0
    if not args.model:
        raise UserError("info needs a MODEL (recipe, model directory or LLM source) or --list")
    from polymodal.build import load_any

    print(parts_table(load_any(args.model, args.set)))
    return 0


def kinds_table() -> str:
    """Every registry's kinds (name and summary), then the kinds of model source."""
    from polymodal import registry
    from polymodal.sources import SOURCE_KINDS

    tables = (("encoders", registry.ENCODERS), ("connectors", registry.CONNECTORS),
              ("fusion", registry.FUSIONS), ("model kinds", registry.MODEL_KINDS),
              ("objectives", registry.OBJECTIVES), ("dataset formats", registry.DATASET_FORMATS),
              ("eval tasks", registry.EVAL_TASKS), ("runners", registry.RUNNERS))
    lines = []
    for title, table in tables:
        lines.append(f"{title}:")
        lines += [f"  {entry.name:<22} {entry.summary}" for entry in table.entries()] or ["  (none)"]
    lines.append("model sources:")
    lines += [f"  {name:<22} {text}" for name, text in SOURCE_KINDS.items()]
    return "\n".join(lines)


def _count(module) -> tuple[int, int]:
    if module is None:
        return 0, 0
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _dtype(module) -> str:
    dtypes = {str(p.dtype).removeprefix("torch.") for p in module.parameters()} if module else set()
    return "/".join(sorted(dtypes)) or "-"


def parts_table(model) -> str:
    """One row per part: kind, source, parameters, trainable parameters, tokens per item,
    dtype; a forecast head's row gives the modality it reads and its horizon."""
    if not hasattr(model, "encoders"):  # a dual encoder: its own parts
        return dual_encoder_table(model)
    config = model.config
    rows = [("part", "kind", "source", "params", "trainable", "tokens/item", "dtype")]
    for modality, encoder in model.encoders.items():  # rows named as a stage's `train:` names them
        source = getattr(config.encoders[modality], "source", "") or "-"
        rows.append((f"encoder.{modality}", config.encoders[modality].kind, source, *_counts(encoder),
                     str(encoder.num_tokens), _dtype(encoder)))
        connector = model.connectors[modality]
        rows.append((f"connector.{modality}", config.connectors[modality].kind, "-", *_counts(connector),
                     str(connector.num_tokens), _dtype(connector)))
    rows.append(("fusion", config.fusion.kind, "-", *_counts(model.fusion), "-", "-"))
    head = model.forecast_head
    if head is not None:  # Time-LLM's linear head: K tokens of its modality -> C x H values
        rows.append(("forecast_head", f"linear on {head.config.modality}, horizon {head.horizon}", "-",
                     *_counts(head), "-", _dtype(head)))
    lora = " + lora" if config.llm.lora else ""
    rows.append(("llm", model.llm.model.config.model_type + lora, config.llm.source,
                 *_counts(model.llm), "-", _dtype(model.llm)))
    rows.append(("total", "", "", *_counts(model), "", ""))
    return _table(rows)


def dual_encoder_table(model) -> str:
    """A dual encoder's parts, as a contrastive stage's `train:` names them: the image
    encoder, the projection (head and logit scale), the text tower."""
    config = model.model_config
    rows = [("part", "kind", "source", "params", "trainable", "dtype")]
    modules = model.part_modules()
    source = getattr(config.encoder, "source", "") or "-"
    rows.append(("encoder", config.encoder.kind, source, *_counts(modules["encoder"]), _dtype(modules["encoder"])))
    rows.append(("projection", config.contrastive.loss, "-", *_counts(modules["projection"]),
                 _dtype(modules["projection"])))
    rows.append(("text", "hf", config.contrastive.text, *_counts(modules["text"]), _dtype(modules["text"])))
    rows.append(("total", "", "", *_counts(model), ""))
    return _table(rows)


def _table(rows: list[tuple[str, ...]]) -> str:
    """Rows in aligned columns, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _counts(module) -> tuple[str, str]:
    total, trainable = _count(module)
    return f"{total:,}", f"{trainable:,}"
