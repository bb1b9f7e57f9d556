"""The Ray driver for `edgelm matrix` (the optional extra edgelm[matrix]): cells, tasks, driver, report."""
