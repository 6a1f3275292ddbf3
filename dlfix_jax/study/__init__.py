"""The study harness: seed-axis execution (``seeds``), runner, results store."""
