"""The node provider of `aigc-ray cluster local`: Ray's fake-multinode provider, one change.

Ray's FakeMultiNodeProvider starts every node it launches under the head's temp dir, so all nodes
share one session directory. Ray's runtime-env agent re-extracts a job's `working_dir` on each
node it reaches (WorkingDirPlugin passes overwrite=True), and with one shared directory a node
that joins mid-job deletes and rewrites the package under the running workers of another node,
whose imports then fail (seen here: `No module named 'aigc_ray.data.formats'` in a Ray Data task
of `ray job submit --working-dir .`). On a real cluster each node has its own disk. So each node
launched here gets its own temp dir (`<cluster temp dir>/n<k>`), as a machine of its own would.

Loaded by the autoscaler (`provider: {type: external, module: ...}`), in the head's monitor
process, which `aigc-ray cluster local up` starts with RAY_FAKE_CLUSTER=1.
"""

from __future__ import annotations

import itertools
import os

import ray._private.parameter as parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class LocalNodeProvider(FakeMultiNodeProvider):
    def __init__(self, provider_config, cluster_name):
        super().__init__(provider_config, cluster_name)
        self._node_dirs = provider_config["node_temp_root"]
        self._count = itertools.count(1)

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        temp_dir = os.path.join(self._node_dirs, f"n{next(self._count)}")
        base = parameter.RayParams

        class _NodeParams(base):  # the provider builds RayParams(...) itself; add temp_dir
            def __init__(self, *args, **kwargs):
                kwargs.setdefault("temp_dir", temp_dir)
                super().__init__(*args, **kwargs)

        with self.lock:  # one launch at a time while the class is swapped
            parameter.RayParams = _NodeParams
            try:
                super()._create_node_with_resources_and_labels(
                    node_config, tags, count, resources, labels
                )
            finally:
                parameter.RayParams = base
