"""One module per stage; thin @dg.asset functions that call the dagster-free core."""
