"""The classic CNN inspection toolbox: summary, graph, filters, feature maps, activation maximisation."""
