"""The host's side of a jail: ``Jail`` (one running jail: its zygote, spare cells and the runs on
them) and the supervisor of a single run (``supervise``/``outcome``)."""
