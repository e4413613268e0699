"""The trainer's stage kinds (``Stage.trainable``) and what each trains.

- "blocks" (stage 1): the DiT blocks; the target reads UMT5 features, the alignment module is untouched;
- "connector" (stage 2, the DiT frozen): the alignment module;
- "all" (stage 3): the whole DiT and the alignment module.

The alignment module's part is its own weights (``TaskAlignment.trainable_parameters``: the connector,
the MetaQueries and the MLLM's LoRA factors; never the MLLM's base weights); the DiT's part is
``trainer.trainable_names``.
"""

#: Each stage kind and whether it trains the alignment module (whose context then replaces UMT5's for the target).
STAGE_SETS = {"blocks": False, "connector": True, "all": True}
TRAINABLE_SETS = tuple(STAGE_SETS)  # "blocks", "connector", "all"


def trains_alignment(stage: str) -> bool:
    """Whether stage kind ``stage`` trains the alignment module; ValueError for an unknown kind."""
    if stage not in STAGE_SETS:
        raise ValueError(f"stage {stage!r}: expected one of {sorted(STAGE_SETS)}")
    return STAGE_SETS[stage]
