"""A small QMP client shared by the bench scripts (standard library only)."""
import json, socket, time


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX); self.s.connect(path); self.f = self.s.makefile("rwb")
        self.events = []
        assert "QMP" in json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line: raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None: msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n"); self.f.flush()
        while True:
            m = self._read()
            if "return" in m: return m["return"]
            if "error" in m: raise RuntimeError(f"{name}: {m['error'].get('desc')}")
            self.events.append(m)

    def wait_event(self, names, key, value, timeout=60):
        """The first event named in `names` whose data[key] == value (taken off the queue)."""
        end = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("event") in names and e.get("data", {}).get(key) == value:
                    return self.events.pop(i)
            if time.monotonic() > end: raise RuntimeError(f"no {names} for {value}")
            self.s.settimeout(max(0.01, end - time.monotonic()))
            try: self.events.append(self._read())
            except socket.timeout: pass
            finally: self.s.settimeout(None)

    def bitmaps(self, node):
        for n in self.cmd("query-named-block-nodes"):
            if n["node-name"] == node: return {b["name"]: b for b in n.get("dirty-bitmaps", [])}
        raise RuntimeError(f"no node {node}")

    def close(self):
        self.s.close()
