"""The thesis's tables from one command: plans (:mod:`.plan`), running them (:mod:`.runner`)
and the tables beside the thesis's numbers (:mod:`.tables`, ``thesis.yaml``)."""
