"""Analysis tools over the whole stack: the layout planner (`plan`) and the layouts-against-one-process verifier
(`verify`)."""
