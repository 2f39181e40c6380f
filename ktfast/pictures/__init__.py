"""What a run or a study looks like: curves, the graph figure, the study figure."""
