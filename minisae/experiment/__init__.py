"""The paper's experiment behind `minisae compare`: SAE variants trained to the same target L0s on
the same data over seeds (`compare`), each with a fairly tuned recipe (`tuning`: the pilot rules),
read at matched L0 into a verdict and a report (`report`) and a Pareto plot (`plot`). Built on
minisae.training (the runs) and minisae.eval (their measurements).
"""
