"""Task registry: a new task is one module plus one line here."""
from reasonlab.tasks.base import Example, Task, parse_line
from reasonlab.tasks.gsm8k import GSM8KTask
from reasonlab.tasks.knowledge_graph import KnowledgeGraphTask
from reasonlab.tasks.multiplication import MultiplicationTask
from reasonlab.tasks.profiles import ProfilesQATask

TASKS: dict[str, type[Task]] = {
    "multiplication": MultiplicationTask,
    "gsm8k": GSM8KTask,
    "profiles_qa": ProfilesQATask,
    "knowledge_graph": KnowledgeGraphTask,
}


def make_task(params) -> Task:
    return TASKS[params.name](params)


__all__ = ["TASKS", "Example", "Task", "make_task", "parse_line"]
