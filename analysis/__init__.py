"""Results -> DataFrames -> paper-style tables and plots. Reads only run-directory files.

- `analysis.load`: `load_results(root) -> Results` (runs, metrics, evals, bench), `aggregate_seeds`.
- `analysis.tables`: `TableSpec`/`Column`/`RowKey`, `SPECS`, `build_table`, `render` (md/csv/tex).
- `analysis.paper`: `load_paper()` (reference/paper.csv), `join_paper(table)` (paper_*/delta_* columns).
- `analysis.plots`: seaborn plots saved as PNG and PDF (`make_plots`, `PLOTS`).
- `analysis.cli`: `mor-tables RESULTS_ROOT --out DIR` (`generate`, `main`).
- `analysis.fixtures`: `make_fake_results(root)`, a realistic fake results tree for tests.

Never imports `models` or `harness` (tested).
"""
