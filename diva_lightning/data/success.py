"""Run-time lookups of the success table (the difficulty-skew knob's input): the shipped table, and the checks
that a table belongs to the policy's weights and the rollouts' temperature.

The table is measured by ``python -m tools.success_table`` (an analysis outside the package; see docs/skew.md).
"""

from __future__ import annotations

from pathlib import Path

from diva_lightning.data.skew import SuccessTable
from diva_lightning.models.embedded import EMBEDDED, SHIPPED_DIR, file_sha256

TABLE_NAME = "success.json"


def weights_digest(policy_dir: str | Path) -> str:
    """sha256 of a checkpoint's weights (what tells base-policy builds apart)."""
    return file_sha256(Path(policy_dir) / "model.safetensors")


def check_table(table: SuccessTable, policy_dir: str | Path, where: str) -> SuccessTable:
    """``table`` if it was measured on the weights in ``policy_dir``; else a ValueError saying how to re-measure."""
    actual = weights_digest(policy_dir)
    if table.weights_sha256 != actual:
        raise ValueError(f"{where}: measured on weights {table.weights_sha256[:12]}..., but the policy at {policy_dir} "
                         f"is {actual[:12]}...: re-measure it (python -m tools.success_table --policy "
                         f"{policy_dir})")
    return table


def check_temperature(table: SuccessTable, temperature: float, where: str) -> SuccessTable:
    """``table`` if it was measured at the rollouts' ``temperature``; else a ValueError saying both and how to fix it.

    A question's success rate depends on the sampling temperature (at 1.0 the embedded policy's rates hardly leave
    [0.1, 0.9]; at 0.5 they reach both ends), so shares chosen at one temperature are not hard or easy at another.
    """
    measured = table.temperature
    if abs(measured - temperature) > 1e-9:
        raise ValueError(f"{where}: the success table was measured at temperature {measured:g}, but the rollouts "
                         f"sample at {temperature:g}: set model.init_args.train_sampling.temperature: {measured:g}, or "
                         f"re-measure the table (python -m tools.success_table --temperature {temperature:g})")
    return table


def table_for(policy_or_table: str) -> SuccessTable:
    """The table named by a skew config: 'embedded' (beside the shipped policy, checked against the shipped weights)
    or a success.json path (taken as it is: it may belong to any policy)."""
    if policy_or_table == EMBEDDED:
        return check_table(SuccessTable.load(SHIPPED_DIR / TABLE_NAME), SHIPPED_DIR, str(SHIPPED_DIR / TABLE_NAME))
    return SuccessTable.load(policy_or_table)
