"""The search of graphs: the search space, the study and its storage, trials packed on a GPU."""
