/*
 * A fake libnvidia-ml.so.1 for tests: exports the NVML entry points that
 * trainctl/health/nvml.py reaches through the real pynvml ctypes code, and
 * answers them from a small text file named by the environment variable
 * FAKE_NVML_FILE, so each simulated node can carry its own GPUs and faults.
 *
 * Build:  gcc -shared -fPIC -O1 -o <dir>/libnvidia-ml.so.1 fakenvml.c
 * Use:    LD_LIBRARY_PATH=<dir> FAKE_NVML_FILE=node0.nvml python ...
 *
 * File format: one `key=value` per line; `#` starts a comment. Global keys:
 *   init_error=9            nvmlReturn_t that nvmlInitWithFlags returns (9: driver not loaded)
 *   device_count=2          number of GPUs (0: "no GPUs")
 *   driver_version=550.54.15
 * Per-GPU keys are `gpu.<index>.<key>`:
 *   name, uuid                       strings
 *   lost=1                           nvmlDeviceGetHandleByIndex returns GPU_IS_LOST (15)
 *   error=<code>                     every query on this GPU's handle returns <code>
 *   xid=79,48                        XID events delivered, in order, through
 *                                    nvmlEventSetCreate/RegisterEvents/EventSetWait
 *   ecc_volatile_uncorrected=N       nvmlDeviceGetTotalEccErrors(UNCORRECTED, VOLATILE)
 *   ecc_aggregate_uncorrected=N      ... (UNCORRECTED, AGGREGATE)
 *   ecc_volatile_corrected=N, ecc_aggregate_corrected=N
 *   retired_pages_pending=1
 *   remap_corrected=N, remap_uncorrected=N, remap_pending=1, remap_failed=1
 *   temperature=85, slowdown_threshold=90   (degrees C)
 *   clock_reasons=0x40               nvmlDeviceGetCurrentClocksEventReasons bitmask
 *   recovery_action=2                field NVML_FI_DEV_GET_GPU_RECOVERY_ACTION (absent: not supported)
 *   not_supported=ecc,remap          queries answering NVML_ERROR_NOT_SUPPORTED; names:
 *                                    ecc retired_pages remap temperature slowdown_threshold
 *                                    clock_reasons recovery_action events
 * Utilisation readings (each absent key answers NVML_ERROR_NOT_SUPPORTED, as a driver or GPU
 * without that counter does; so a file written before these keys existed reads as "not
 * available", never as a fault):
 *   util_gpu=90, util_memory=40      nvmlDeviceGetUtilizationRates (percent)
 *   memory_used_mib=60000, memory_total_mib=81559   nvmlDeviceGetMemoryInfo (both needed)
 *   power_mw=650000                  nvmlDeviceGetPowerUsage (milliwatts)
 *   power_limit_mw=700000            nvmlDeviceGetEnforcedPowerLimit (milliwatts)
 *   sm_clock_mhz=1980, sm_clock_max_mhz=1980   nvmlDeviceGet{,Max}ClockInfo(NVML_CLOCK_SM)
 *
 * The file is re-read on every call, so a test may add a fault while a process runs;
 * XIDs already delivered are remembered per process and not delivered twice.
 * Init is reference-counted like the real library's: every nvmlInit needs its nvmlShutdown,
 * so two users in one process (the health probe and the utilisation sampler) coexist.
 * A missing FAKE_NVML_FILE makes init fail with NVML_ERROR_UNKNOWN: a typo in a
 * test must not look like a healthy machine.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999,
};

#define MAX_GPUS 64
#define MAX_XIDS 32
#define TEXT 96
#define XID_EVENT 0x8ULL /* nvmlEventTypeXidCriticalError */
#define FIELD_RECOVERY_ACTION 230 /* NVML_FI_DEV_GET_GPU_RECOVERY_ACTION */

struct fake_gpu {
    char name[TEXT];
    char uuid[TEXT];
    char not_supported[256];
    int lost, error;
    int xids[MAX_XIDS];
    int num_xids;
    unsigned long long ecc[2][2]; /* [error type][counter type] */
    unsigned int retired_pages_pending;
    unsigned int remap_corrected, remap_uncorrected, remap_pending, remap_failed;
    unsigned int temperature, slowdown_threshold;
    unsigned long long clock_reasons;
    int recovery_action; /* -1: not supported */
    /* Utilisation readings; -1: the key is absent, the query answers NOT_SUPPORTED. */
    long long util_gpu, util_memory, memory_used_mib, memory_total_mib;
    long long power_mw, power_limit_mw, sm_clock_mhz, sm_clock_max_mhz;
};

struct fake_state {
    int init_error;
    unsigned int device_count;
    char driver_version[TEXT];
    struct fake_gpu gpus[MAX_GPUS];
};

/* Handles are pointers into this array; the index is recovered by subtraction. */
struct fake_device { int index; };
static struct fake_device devices[MAX_GPUS];
static int xids_delivered[MAX_GPUS];
static int initialized;
static struct fake_state state;

struct fake_event_set { unsigned long long registered[MAX_GPUS]; };

typedef struct {
    struct fake_device *device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

typedef union {
    double dVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    long long sllVal;
    int siVal;
    unsigned short usVal;
} nvmlValue_t;

typedef struct {
    unsigned int fieldId;
    unsigned int scopeId;
    long long timestamp;
    long long latencyUsec;
    int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

static char *trim(char *text) {
    while (isspace((unsigned char)*text)) text++;
    char *end = text + strlen(text);
    while (end > text && isspace((unsigned char)end[-1])) *--end = '\0';
    return text;
}

static void copy_text(char *dest, const char *src, size_t size) {
    snprintf(dest, size, "%s", src);
}

static void set_gpu_key(struct fake_gpu *gpu, const char *key, const char *value) {
    unsigned long long number = strtoull(value, NULL, 0);
    if (!strcmp(key, "name")) copy_text(gpu->name, value, TEXT);
    else if (!strcmp(key, "uuid")) copy_text(gpu->uuid, value, TEXT);
    else if (!strcmp(key, "not_supported")) copy_text(gpu->not_supported, value, 256);
    else if (!strcmp(key, "lost")) gpu->lost = (int)number;
    else if (!strcmp(key, "error")) gpu->error = (int)number;
    else if (!strcmp(key, "xid")) {
        const char *cursor = value;
        gpu->num_xids = 0;
        while (*cursor && gpu->num_xids < MAX_XIDS) {
            char *end;
            long xid = strtol(cursor, &end, 0);
            if (end == cursor) break;
            gpu->xids[gpu->num_xids++] = (int)xid;
            cursor = end;
            while (*cursor == ',' || isspace((unsigned char)*cursor)) cursor++;
        }
    }
    else if (!strcmp(key, "ecc_volatile_corrected")) gpu->ecc[0][0] = number;
    else if (!strcmp(key, "ecc_aggregate_corrected")) gpu->ecc[0][1] = number;
    else if (!strcmp(key, "ecc_volatile_uncorrected")) gpu->ecc[1][0] = number;
    else if (!strcmp(key, "ecc_aggregate_uncorrected")) gpu->ecc[1][1] = number;
    else if (!strcmp(key, "retired_pages_pending")) gpu->retired_pages_pending = (unsigned)number;
    else if (!strcmp(key, "remap_corrected")) gpu->remap_corrected = (unsigned)number;
    else if (!strcmp(key, "remap_uncorrected")) gpu->remap_uncorrected = (unsigned)number;
    else if (!strcmp(key, "remap_pending")) gpu->remap_pending = (unsigned)number;
    else if (!strcmp(key, "remap_failed")) gpu->remap_failed = (unsigned)number;
    else if (!strcmp(key, "temperature")) gpu->temperature = (unsigned)number;
    else if (!strcmp(key, "slowdown_threshold")) gpu->slowdown_threshold = (unsigned)number;
    else if (!strcmp(key, "clock_reasons")) gpu->clock_reasons = number;
    else if (!strcmp(key, "recovery_action")) gpu->recovery_action = (int)number;
    else if (!strcmp(key, "util_gpu")) gpu->util_gpu = (long long)number;
    else if (!strcmp(key, "util_memory")) gpu->util_memory = (long long)number;
    else if (!strcmp(key, "memory_used_mib")) gpu->memory_used_mib = (long long)number;
    else if (!strcmp(key, "memory_total_mib")) gpu->memory_total_mib = (long long)number;
    else if (!strcmp(key, "power_mw")) gpu->power_mw = (long long)number;
    else if (!strcmp(key, "power_limit_mw")) gpu->power_limit_mw = (long long)number;
    else if (!strcmp(key, "sm_clock_mhz")) gpu->sm_clock_mhz = (long long)number;
    else if (!strcmp(key, "sm_clock_max_mhz")) gpu->sm_clock_max_mhz = (long long)number;
    else fprintf(stderr, "fakenvml: unknown GPU key %s\n", key);
}

/* Reads FAKE_NVML_FILE into `state`; returns NVML_ERROR_UNKNOWN when it cannot. */
static nvmlReturn_t load_state(void) {
    memset(&state, 0, sizeof state);
    state.device_count = 1;
    copy_text(state.driver_version, "550.54.15", TEXT);
    for (int i = 0; i < MAX_GPUS; i++) {
        snprintf(state.gpus[i].name, TEXT, "NVIDIA H100 80GB HBM3");
        snprintf(state.gpus[i].uuid, TEXT, "GPU-00000000-fake-0000-0000-%012d", i);
        state.gpus[i].temperature = 40;
        state.gpus[i].slowdown_threshold = 90;
        state.gpus[i].recovery_action = -1;
        state.gpus[i].util_gpu = state.gpus[i].util_memory = -1;
        state.gpus[i].memory_used_mib = state.gpus[i].memory_total_mib = -1;
        state.gpus[i].power_mw = state.gpus[i].power_limit_mw = -1;
        state.gpus[i].sm_clock_mhz = state.gpus[i].sm_clock_max_mhz = -1;
    }
    const char *path = getenv("FAKE_NVML_FILE");
    FILE *file = path ? fopen(path, "r") : NULL;
    if (!file) {
        fprintf(stderr, "fakenvml: cannot read FAKE_NVML_FILE=%s\n", path ? path : "(unset)");
        return NVML_ERROR_UNKNOWN;
    }
    char line[512];
    while (fgets(line, sizeof line, file)) {
        char *hash = strchr(line, '#');
        if (hash) *hash = '\0';
        char *equals = strchr(line, '=');
        if (!equals) continue;
        *equals = '\0';
        char *key = trim(line), *value = trim(equals + 1);
        if (!strcmp(key, "init_error")) state.init_error = atoi(value);
        else if (!strcmp(key, "device_count")) state.device_count = (unsigned)atoi(value);
        else if (!strcmp(key, "driver_version")) copy_text(state.driver_version, value, TEXT);
        else if (!strncmp(key, "gpu.", 4)) {
            char *end;
            long index = strtol(key + 4, &end, 10);
            if (*end == '.' && index >= 0 && index < MAX_GPUS)
                set_gpu_key(&state.gpus[index], end + 1, value);
        } else fprintf(stderr, "fakenvml: unknown key %s\n", key);
    }
    fclose(file);
    if (state.device_count > MAX_GPUS) state.device_count = MAX_GPUS;
    return NVML_SUCCESS;
}

static int has_word(const char *list, const char *word) {
    size_t length = strlen(word);
    for (const char *at = strstr(list, word); at; at = strstr(at + 1, word)) {
        int starts = at == list || at[-1] == ',' || isspace((unsigned char)at[-1]);
        int ends = at[length] == '\0' || at[length] == ',' || isspace((unsigned char)at[length]);
        if (starts && ends) return 1;
    }
    return 0;
}

/* Common prologue of every device query: reload, validate the handle, apply faults. */
static nvmlReturn_t device_query(struct fake_device *device, const char *feature,
                                 struct fake_gpu **gpu) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t loaded = load_state();
    if (loaded != NVML_SUCCESS) return loaded;
    if (device < devices || device >= devices + MAX_GPUS) return NVML_ERROR_INVALID_ARGUMENT;
    int index = (int)(device - devices);
    if ((unsigned)index >= state.device_count) return NVML_ERROR_INVALID_ARGUMENT;
    *gpu = &state.gpus[index];
    if ((*gpu)->lost) return NVML_ERROR_GPU_IS_LOST;
    if ((*gpu)->error) return (*gpu)->error;
    if (feature && has_word((*gpu)->not_supported, feature)) return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    nvmlReturn_t loaded = load_state();
    if (loaded != NVML_SUCCESS) return loaded;
    if (state.init_error) return state.init_error;
    for (int i = 0; i < MAX_GPUS; i++) devices[i].index = i;
    initialized++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    initialized--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t loaded = load_state();
    if (loaded != NVML_SUCCESS) return loaded;
    if (strlen(state.driver_version) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    copy_text(version, state.driver_version, length);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t loaded = load_state();
    if (loaded != NVML_SUCCESS) return loaded;
    *count = state.device_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, struct fake_device **device) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t loaded = load_state();
    if (loaded != NVML_SUCCESS) return loaded;
    if (index >= state.device_count) return NVML_ERROR_INVALID_ARGUMENT;
    if (state.gpus[index].lost) return NVML_ERROR_GPU_IS_LOST;
    *device = &devices[index];
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_out(const char *text, char *out, unsigned int length) {
    if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    copy_text(out, text, length);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(struct fake_device *device, char *name, unsigned int length) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, NULL, &gpu);
    return ret != NVML_SUCCESS ? ret : copy_out(gpu->name, name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(struct fake_device *device, char *uuid, unsigned int length) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, NULL, &gpu);
    return ret != NVML_SUCCESS ? ret : copy_out(gpu->uuid, uuid, length);
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(struct fake_device *device, int error_type,
                                         int counter_type, unsigned long long *count) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, "ecc", &gpu);
    if (ret != NVML_SUCCESS) return ret;
    if (error_type < 0 || error_type > 1 || counter_type < 0 || counter_type > 1)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = gpu->ecc[error_type][counter_type];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(struct fake_device *device, int *pending) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, "retired_pages", &gpu);
    if (ret != NVML_SUCCESS) return ret;
    *pending = gpu->retired_pages_pending ? 1 : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetRemappedRows(struct fake_device *device, unsigned int *corrected,
                                       unsigned int *uncorrected, unsigned int *pending,
                                       unsigned int *failed) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, "remap", &gpu);
    if (ret != NVML_SUCCESS) return ret;
    *corrected = gpu->remap_corrected;
    *uncorrected = gpu->remap_uncorrected;
    *pending = gpu->remap_pending;
    *failed = gpu->remap_failed;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(struct fake_device *device, int sensor,
                                      unsigned int *temperature) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, "temperature", &gpu);
    if (ret != NVML_SUCCESS) return ret;
    if (sensor != 0) return NVML_ERROR_INVALID_ARGUMENT; /* only NVML_TEMPERATURE_GPU */
    *temperature = gpu->temperature;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperatureThreshold(struct fake_device *device, int threshold,
                                               unsigned int *temperature) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, "slowdown_threshold", &gpu);
    if (ret != NVML_SUCCESS) return ret;
    if (threshold != 1) return NVML_ERROR_NOT_SUPPORTED; /* only SLOWDOWN is simulated */
    *temperature = gpu->slowdown_threshold;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(struct fake_device *device,
                                                    unsigned long long *reasons) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, "clock_reasons", &gpu);
    if (ret != NVML_SUCCESS) return ret;
    *reasons = gpu->clock_reasons;
    return NVML_SUCCESS;
}

/* The pre-12.2 name of the same query; older drivers export only this one. */
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(struct fake_device *device,
                                                       unsigned long long *reasons) {
    return nvmlDeviceGetCurrentClocksEventReasons(device, reasons);
}

nvmlReturn_t nvmlDeviceGetFieldValues(struct fake_device *device, int count,
                                      nvmlFieldValue_t *values) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, NULL, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    for (int i = 0; i < count; i++) {
        /* Like the driver, a field the GPU lacks fails in its own slot, not the call. */
        values[i].nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        if (values[i].fieldId == FIELD_RECOVERY_ACTION && gpu->recovery_action >= 0 &&
            !has_word(gpu->not_supported, "recovery_action")) {
            values[i].nvmlReturn = NVML_SUCCESS;
            values[i].valueType = 1; /* NVML_VALUE_TYPE_UNSIGNED_INT */
            values[i].value.uiVal = (unsigned)gpu->recovery_action;
        }
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetCreate(struct fake_event_set **set) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    *set = calloc(1, sizeof **set);
    return *set ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(struct fake_device *device,
                                              unsigned long long *types) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, "events", &gpu);
    if (ret != NVML_SUCCESS) return ret;
    *types = XID_EVENT;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(struct fake_device *device, unsigned long long types,
                                      struct fake_event_set *set) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, "events", &gpu);
    if (ret != NVML_SUCCESS) return ret;
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    if (types & ~XID_EVENT) return NVML_ERROR_NOT_SUPPORTED;
    set->registered[device - devices] |= types;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetWait_v2(struct fake_event_set *set, nvmlEventData_t *data,
                                 unsigned int timeout_ms) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t loaded = load_state();
    if (loaded != NVML_SUCCESS) return loaded;
    for (unsigned i = 0; i < state.device_count; i++) {
        if (!(set->registered[i] & XID_EVENT)) continue;
        if (xids_delivered[i] < state.gpus[i].num_xids) {
            memset(data, 0, sizeof *data);
            data->device = &devices[i];
            data->eventType = XID_EVENT;
            data->eventData = (unsigned long long)state.gpus[i].xids[xids_delivered[i]++];
            return NVML_SUCCESS;
        }
    }
    /* Like the driver, block for the timeout when nothing is pending. */
    usleep(timeout_ms * 1000u);
    return NVML_ERROR_TIMEOUT;
}

nvmlReturn_t nvmlEventSetFree(struct fake_event_set *set) {
    free(set);
    return NVML_SUCCESS;
}

/* -- utilisation readings ---------------------------------------------------------------- */

typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
#define NVML_CLOCK_SM 1
#define MIB (1024ULL * 1024ULL)

nvmlReturn_t nvmlDeviceGetUtilizationRates(struct fake_device *device, nvmlUtilization_t *util) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, NULL, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    if (gpu->util_gpu < 0 || gpu->util_memory < 0) return NVML_ERROR_NOT_SUPPORTED;
    util->gpu = (unsigned)gpu->util_gpu;
    util->memory = (unsigned)gpu->util_memory;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(struct fake_device *device, nvmlMemory_t *memory) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, NULL, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    if (gpu->memory_used_mib < 0 || gpu->memory_total_mib < 0) return NVML_ERROR_NOT_SUPPORTED;
    memory->total = (unsigned long long)gpu->memory_total_mib * MIB;
    memory->used = (unsigned long long)gpu->memory_used_mib * MIB;
    memory->free = memory->total > memory->used ? memory->total - memory->used : 0;
    return NVML_SUCCESS;
}

static nvmlReturn_t unsigned_reading(long long value, unsigned int *out) {
    if (value < 0) return NVML_ERROR_NOT_SUPPORTED;
    *out = (unsigned)value;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(struct fake_device *device, unsigned int *milliwatts) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, NULL, &gpu);
    return ret != NVML_SUCCESS ? ret : unsigned_reading(gpu->power_mw, milliwatts);
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(struct fake_device *device, unsigned int *milliwatts) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, NULL, &gpu);
    return ret != NVML_SUCCESS ? ret : unsigned_reading(gpu->power_limit_mw, milliwatts);
}

nvmlReturn_t nvmlDeviceGetClockInfo(struct fake_device *device, int type, unsigned int *mhz) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, NULL, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    if (type != NVML_CLOCK_SM) return NVML_ERROR_NOT_SUPPORTED; /* only the SM clock is simulated */
    return unsigned_reading(gpu->sm_clock_mhz, mhz);
}

nvmlReturn_t nvmlDeviceGetMaxClockInfo(struct fake_device *device, int type, unsigned int *mhz) {
    struct fake_gpu *gpu;
    nvmlReturn_t ret = device_query(device, NULL, &gpu);
    if (ret != NVML_SUCCESS) return ret;
    if (type != NVML_CLOCK_SM) return NVML_ERROR_NOT_SUPPORTED;
    return unsigned_reading(gpu->sm_clock_max_mhz, mhz);
}
