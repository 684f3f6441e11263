"""Quality control of an output folder: `check` (verdicts with reason codes) and `report` (the HTML gallery)."""
