"""The course machinery: exercise checks, the lesson builder and the grader.

- :mod:`minivfm.course.checks`: what check cells call (one module per lesson).
- :mod:`minivfm.course.build`: ``minivfm course build [--check]`` writes
  ``lessons/`` from ``solutions/`` (:func:`~minivfm.course.build.build_lesson`,
  :func:`~minivfm.course.build.build_lessons`).
- :mod:`minivfm.course.grade`: ``minivfm grade SUBMISSION.ipynb ...`` merges a
  student's exercise cells into the reference and runs it under nbval
  (:func:`~minivfm.course.grade.grade_notebook`,
  :func:`~minivfm.course.grade.merge_submission`).
- :mod:`minivfm.course.notebook`: reading and writing notebooks, the cell
  contract, solution stubs, the nbval sanitize patterns.
- :mod:`minivfm.course.nbval_plugin`: the pytest plugin the grader loads next
  to nbval.

Nothing is imported here, so ``from minivfm.course import checks`` in a
notebook stays cheap.
"""
