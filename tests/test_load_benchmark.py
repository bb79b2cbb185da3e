"""The load benchmark's pieces that need no server: the slow requests' cells and the printed tables."""

import os

import numpy as np
import pandas as pd

from contrastive_sc.benchmarks.load import cells_at_size, markdown, server_memory


def test_cells_at_size_draws_new_cells_like_the_given_ones():
    counts = pd.DataFrame(np.arange(12).reshape(4, 3), columns=["a", "b", "c"])
    many = cells_at_size(counts, 50, seed=1)
    assert many.shape == (50, 3) and list(many.columns) == ["a", "b", "c"] and many.index.is_unique
    assert (many.to_numpy() >= 0).all() and many.to_numpy().dtype.kind == "i"
    pd.testing.assert_frame_equal(many, cells_at_size(counts, 50, seed=1))


def test_server_memory_counts_a_process_group():
    memory = server_memory(os.getpgid(0))
    assert memory["total"] > 0 and memory["workers"] >= 0


def test_markdown_has_the_four_tables():
    quick = [(200, 0.1, ""), (200, 0.3, ""), (200, 0.2, "")]
    result = {"settings": {"slow_cells": 5000, "slow_neighbors": 400, "genes": 2000, "slow_body_mb": 30.0,
                           "refused_cells": 10000, "refused_neighbors": 1000, "refused_body_mb": 60.0,
                           "request_cells": 500, "clients": 8, "requests_per_client": 4, "cores": 2, "load": 1.0},
              "runs": [{"workers": 1, "quick": quick, "refused": (400, 0.5, "over this server's budget"),
                        "slow": [(503, 1.0, "busy: retry")] * 6 + [(504, 61.0, "took longer")] * 2,
                        "memory": {k: {"workers": 250.0, "total": 800.0} for k in ("before", "peak", "after")},
                        "throughput": {"answers": [(200, 0.4, "")] * 32, "seconds": 4.0, "cells": 16000}}]}
    text = markdown(result)
    assert "| 1 | 3 | 3 x 200 | 0.20 | 0.29 | 0.30 | yes |" in text
    assert "| 1 | issue 24's, alone | 400 | 0.5 | over this server's budget |" in text
    assert "| 1 | 800 | 800 | 800 | 250 | 250 | 250 |" in text
    assert "| 1 | 8 | 32 | 32 x 200 | 4,000 | 8.0 | 400 | 400 |" in text
