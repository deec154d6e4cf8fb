"""Source text shared by the benchmarks' memory probes, which run in fresh processes
(`python -c SCRIPT`): reading VmRSS / VmHWM and resetting the high-water mark."""

PROC_STATUS_HELPERS = r'''
def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)

def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
'''
