"""`minidisc plan`: will a MiniDisc run fit on a cluster, and where should the teacher and the supernet live?

`presets` names published shapes, `shapes` reads a model's shape and counts parameters per width,
`estimate` turns a shape, a cluster and the run's options into bytes per GPU for every placement, `advice`
picks one, says what to change when none fits and prints it. Everything is computed from the config alone
(no weights).
"""
