"""The step script of ``env=textgame env.sandboxed=true``: plays one TextWorld Express game inside
an episode's sandbox and prints the state it reaches (run as ``python3 -I -S textgame_step.py``
in the sandbox's work directory; standard library plus the py4j client copied next to it).

TextWorld Express has no stdin/stdout driver, only its py4j entry point (``PythonInterface``), and
the process sandbox keeps no process alive between two execs. So every exec starts a JVM of its
own *inside the sandbox* (py4j's ``launch_gateway`` with the jars from the work directory, on the
sandbox's loopback), generates the game from its seed and replays the episode's commands, then
prints one JSON line: the last response of the engine (TextWorld Express's step JSON + the task
description), the score delta of the last command (``TextWorldExpressEnv.step``'s reward), the
``look`` text of every state from the reset on (the host's record of visited rooms), the object
tree where asked, and the gold path where asked.

Input (JSON on stdin): ``game``, ``params``, ``fold``, ``seed``, ``actions`` (the commands to
replay, each one of the then-valid actions), ``tree`` (bool), ``gold`` (bool).

The JVM runs under the sandbox's address-space limit (``RLIMIT_AS`` = ``sandbox.memory_mb``), so it
is started with small fixed reservations (:data:`JAVA_OPTS`: heap, code cache, class space,
metaspace, serial GC, C1 only, and ``MALLOC_ARENA_MAX=2`` against glibc's per-thread arenas):
it starts at the default ``sandbox.memory_mb=512`` (measured; without them it needs 4096).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
#: the files the host writes next to this script (see environments/tasks/textgame_sandboxed.py)
PY4J_JAR = "py4j.jar"
TWX_JAR = "textworld-express.jar"
JAVA_OPTS = ["-Xmx128m", "-XX:ReservedCodeCacheSize=16m", "-XX:CompressedClassSpaceSize=32m", "-XX:MaxMetaspaceSize=64m",
             "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:CICompilerCount=1", "-XX:-UsePerfData",
             "-Djava.io.tmpdir=" + HERE]


def main() -> int:
    req = json.loads(sys.stdin.read())
    sys.path.insert(0, HERE)
    os.environ["MALLOC_ARENA_MAX"] = "2"
    from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway

    port, proc = launch_gateway(jarpath=os.path.join(HERE, PY4J_JAR), classpath=os.path.join(HERE, TWX_JAR),
                                javaopts=JAVA_OPTS, die_on_exit=True, cwd=HERE, return_proc=True)
    gateway = JavaGateway(gateway_parameters=GatewayParameters(port=port, auto_field=True), java_process=proc)
    try:
        server = gateway.jvm.textworldexpress.runtime.PythonInterface()
        msg = server.load(req["game"], req["params"])
        if msg:
            raise ValueError(str(msg))
        info = json.loads(server.generateNewGameJSON(int(req["seed"]), req["fold"], bool(req.get("gold"))))
        looks = [info.get("look", "")]
        last, reward = 0, 0  # TextWorldExpressEnv.reset sets lastStepScore = 0
        for a in req["actions"]:
            info = json.loads(server.stepJSON(str(a)))
            score = info["score"]
            reward, last = score - last, score
            looks.append(info.get("look", ""))
        info["taskDescription"] = server.getTaskDescription()
        out = {"info": info, "reward": reward, "looks": looks, "steps": len(req["actions"])}
        if req.get("tree"):
            path = os.path.join(HERE, "object_tree.json")
            err = server.getObjectTree(path)
            if err:
                raise RuntimeError(str(err))
            with open(path, "rb") as f:
                out["tree"] = json.loads(f.read())
        if req.get("gold"):
            out["gold"] = [str(a) for a in server.getGoldActionSequence()]
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    finally:
        try:
            gateway.shutdown()
        except Exception:  # noqa: BLE001 - the sandbox kills what is left
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
