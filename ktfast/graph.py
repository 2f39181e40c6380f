class GraphError(ValueError):
    pass


class Graph:
    pass
