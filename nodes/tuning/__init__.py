"""The tuning tools: nodes that help an artist choose omega and lambda by eye (a sweep grid, a schedule preview,
presets), and the helpers only they use (the image grid, the plot, the preset files). The sampling engine does not
depend on anything here."""
