"""The schedules: `compress` (MiniDisc), `distill` (a given TA or none) and `maxidisc`, on one shared run set-up."""
