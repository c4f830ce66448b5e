"""Scenarios: task streams built from caption datasets (see :mod:`.base` for the registry)."""

from .base import (Scenario, ScenarioBuilder, available_scenarios, build_scenario, get_scenario_builder,
                   register_scenario, resolve_data_root)

__all__ = ["Scenario", "ScenarioBuilder", "available_scenarios", "build_scenario", "get_scenario_builder",
           "register_scenario", "resolve_data_root"]
