"""`minidisc plan`: will a MiniDisc run fit on a cluster, and where should the teacher and the supernet live?

`shapes` reads a model's shape and counts parameters per width, `estimate` turns a shape, a cluster and the
run's options into bytes per GPU for every placement, `advice` picks one, says what to change when none fits
and prints it. Everything is computed from the config alone (no weights).
"""
from engine.tools.memory_plan.advice import advice, ds_config_for, plan_report, print_plan, recommend, run_plan
from engine.tools.memory_plan.estimate import (
                                               GIB,
                                               HEADROOM,
                                               Cluster,
                                               Placement,
                                               PlanOptions,
                                               activation_bytes,
                                               loss_buffer_bytes,
                                               plan_memory,
                                               teacher_bytes,
                                               trained_model_states,
)
from engine.tools.memory_plan.shapes import (
                                               PRESETS,
                                               Shapes,
                                               largest_layer_parameters,
                                               load_model_config,
                                               parameter_count,
                                               preset_config,
                                               unit_parameters,
                                               width_parameters,
)

__all__ = ["GIB", "HEADROOM", "PRESETS", "Cluster", "Placement", "PlanOptions", "Shapes", "activation_bytes", "advice",
           "ds_config_for", "largest_layer_parameters", "load_model_config", "loss_buffer_bytes", "parameter_count",
           "plan_memory", "plan_report", "preset_config", "print_plan", "recommend", "run_plan", "teacher_bytes",
           "trained_model_states", "unit_parameters", "width_parameters"]
