/*
 * mpevent.processes._fastpath: the producer's fast path in C (optional).
 *
 * One file of ~800 lines on purpose: one extension module whose two types
 * share lane_push; about half of it is CPython's type and argument
 * boilerplate, and the fast path reads top to bottom in FastPath_raise_event.
 *
 * What it owns
 * ------------
 * - `Lane`: the producer end of one lane, the same record format, arithmetic
 *   and interface as mpevent/shm/ring.py's `LaneWriter` (`push`, `tail`).
 * - `FastPath`: the base of the compiled producer
 *   (mpevent/processes/producer.py, `_CompiledProducer(FastPath, Producer)`).
 *   It stores the attributes the pure `Producer.raise_event` reads on every
 *   call (`_fast`, `_words`, `_lane`, `_sleep_word`, `_doorbell`) in C slots,
 *   so the producer's Python code sets them exactly as it does for the pure
 *   path, and its `raise_event` runs the common path without bytecode: the
 *   entry lookup, the probe, orjson's `dumps` through vectorcall, the size
 *   check, the record write, the tail's release store, the counters, the
 *   doorbell.
 *
 * Invariants
 * ----------
 * - The pure `Producer.raise_event` is the reference. Whatever this code does
 *   not handle itself (a first raise, a lane not of this module, a count that
 *   needs the lock, the hub gone, params that are not None or a non-empty
 *   dict, a TypeError or a "null" from dumps, oversize, anything that does not
 *   look as expected) is handed to it BEFORE any side effect, so results,
 *   counters, exception types and messages are the reference's by
 *   construction. The only side effects made here are the ones the reference
 *   makes on the same path, in the same order.
 * - Threads: the GIL is held from the entry lookup to the publish. The one
 *   call into Python in between is orjson.dumps (it may run Python code, e.g.
 *   a property of a dataclass, and so switch threads); it comes before the
 *   lane is touched, and everything another thread may have changed
 *   meanwhile (the view, the lane, the sleep word) is read again after it.
 *   Python pushes go through Lane.push, one C call, so a thread switch never
 *   falls inside a push. Free-threaded builds are refused at compile time.
 * - Memory: a Lane holds a buffer export of the segment's mapping
 *   (PyObject_GetBuffer), so the mapping cannot be unmapped while it lives
 *   (Segment.close tolerates the export: mmap.close raises BufferError, which
 *   it ignores). Every word index from Python is checked against the size of
 *   the view on every call (a bad one goes to the pure path, which raises
 *   IndexError as before); tail and head come from shared memory and are
 *   checked before a write is placed by them: a lane whose tail and head are
 *   inconsistent refuses the push (counted as dropped, `Lane.refused`), and
 *   no write ever leaves the lane, whatever the words hold.
 * - Ordering: the record's bytes with plain stores, then the tail with
 *   __atomic_store_n(RELEASE); the consumer's head loaded with ACQUIRE;
 *   counters (one writer each) as relaxed atomic load + store, atomic with
 *   respect to the pure path's `+=` because both run under the GIL.
 * - SIGKILL at any instruction: a record is published by the one 8-byte
 *   release store of the tail or not at all, as in ring.py.
 * - The constants below are mpevent/shm/layout.py's; fastpath.py compares them
 *   at import and refuses an extension built from another layout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: pyconfig.h defines _GNU_SOURCE (memmem) */
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef Py_GIL_DISABLED
#error "the compiled fast path relies on the GIL; setup.py does not build it on free-threaded CPython"
#endif

#define RECORD_HEADER_BYTES 16
#define FLAG_WRAP 1
#define L_TAIL 0
#define L_HEAD 8
#define COUNTER_WORDS 8
#define P_ENQUEUED 0
#define P_DROPPED 1
#define HUB_GONE (UINT64_C(1) << 62)
#define MAX_EVENT_ID 0xFFFF
#define MAX_LANE_SIZE (UINT64_C(1) << 40)

/* Set once by configure(): the reference raise_event and the Doorbell class. */
static PyObject *pure_raise_event;
static PyTypeObject *doorbell_type;
static PyObject *dumps; /* orjson.dumps, the pure path's encoder */
static PyObject *str_write_fd, *str_ring, *str_on_hub_down, *str_check_hub;

static inline uint64_t
load_relaxed(const uint64_t *word)
{
    return __atomic_load_n(word, __ATOMIC_RELAXED);
}

/* A single-writer counter: no read-modify-write instruction needed. */
static inline void
count(uint64_t *word)
{
    __atomic_store_n(word, __atomic_load_n(word, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
}

static inline uint64_t
monotonic_ns(void)
{
    /* time.monotonic_ns() reads the same clock. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * UINT64_C(1000000000) + (uint64_t)ts.tv_nsec;
}

/* What memoryview's own item access checks (CHECK_RELEASED): a released
   view (Segment.close) must not be used, whatever it still points to. */
static inline int
view_released(PyObject *view)
{
    const PyMemoryViewObject *mv = (const PyMemoryViewObject *)view;
    return (mv->flags & _Py_MEMORYVIEW_RELEASED) || (mv->mbuf->flags & _Py_MANAGED_BUFFER_RELEASED);
}

/* ------------------------------------------------------------------------ */
/* Lane                                                                     */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_buffer map;       /* export of the whole mapping: keeps it mapped */
    unsigned char *data; /* the lane's size bytes, inside map */
    uint64_t *tail_word; /* inside map */
    uint64_t *head_word; /* inside map */
    uint64_t size;       /* a power of two */
    uint64_t tail;       /* ours: we are the lane's only writer */
    uint64_t head;       /* the consumer's released position when last loaded */
    Py_ssize_t refused;  /* pushes refused because tail and head were inconsistent */
} Lane;

static PyTypeObject LaneType;

enum { PUSH_REFUSED = -1, PUSH_FULL = 0, PUSH_DONE = 1 };

/*
 * LaneWriter.push with its slow paths folded in: the same outcomes and bytes.
 * Writes only inside [data, data + size): an offset is masked and a record
 * is placed only where it ends before the end of the lane.
 */
static int
lane_push(Lane *lane, uint64_t event_id, const char *body, uint64_t n, uint64_t raised_ns)
{
    const uint64_t size = lane->size;
    if (n > size) {
        return PUSH_FULL; /* cannot fit even an empty lane: LaneWriter refuses it too */
    }
    const uint64_t span = (n + RECORD_HEADER_BYTES + 7) & ~UINT64_C(7);
    if (span > size) {
        return PUSH_FULL;
    }
    uint64_t tail = lane->tail;
    if (tail & 7) {
        lane->refused++; /* a tail from shared memory no record could have left */
        return PUSH_REFUSED;
    }
    uint64_t off = tail & (size - 1);
    const uint64_t to_end = size - off;
    /* The bytes this record takes from the tail: its span, plus the padding to
       the end when it does not fit before it (then more than size is possible). */
    const uint64_t need = span <= to_end ? span : to_end + span;
    /* Unsigned: a cached head past the tail makes tail - head huge: reloaded. */
    if (need > size || tail - lane->head > size - need) {
        /* Full as far as we knew: only now look at the consumer's head, whose
           cache line lives on the sender's core. */
        const uint64_t head = __atomic_load_n(lane->head_word, __ATOMIC_ACQUIRE);
        if (head > tail || tail - head > size) {
            lane->refused++; /* the consumer cannot have released that */
            return PUSH_REFUSED;
        }
        lane->head = head;
        if (need > size || tail - head > size - need) {
            return PUSH_FULL;
        }
    }
    if (span > to_end) {
        /* Does not fit before the end: pad to it (a wrap marker when a header
           fits there, else nothing) and write at offset 0. */
        if (to_end >= RECORD_HEADER_BYTES) {
            *(uint64_t *)(lane->data + off) = (uint64_t)FLAG_WRAP << 48;
        }
        tail += to_end;
        off = 0;
    }
    uint64_t *header = (uint64_t *)(lane->data + off);
    header[0] = n | event_id << 32;
    header[1] = raised_ns;
    if (n) {
        memcpy(lane->data + off + RECORD_HEADER_BYTES, body, (size_t)n);
    }
    tail += span;
    lane->tail = tail;
    __atomic_store_n(lane->tail_word, tail, __ATOMIC_RELEASE); /* publish */
    return PUSH_DONE;
}

static PyObject *
Lane_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buf", "words", "ctl_word", "data_at", "size", NULL};
    PyObject *buf, *words;
    Py_ssize_t ctl_word, data_at, size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!nnn:Lane", kwlist, &PyMemoryView_Type,
                                     &buf, &PyMemoryView_Type, &words, &ctl_word, &data_at,
                                     &size)) {
        return NULL;
    }
    if (view_released(buf) || view_released(words)) {
        PyErr_SetString(PyExc_ValueError, "operation forbidden on released memoryview object");
        return NULL;
    }
    Py_buffer *bv = PyMemoryView_GET_BUFFER(buf);
    Py_buffer *wv = PyMemoryView_GET_BUFFER(words);
    PyObject *base = PyMemoryView_GET_BASE(buf);
    if (base == NULL) {
        PyErr_SetString(PyExc_ValueError, "buf must be a view of an object that exports it");
        return NULL;
    }
    Lane *self = (Lane *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    /* Exported from what buf views (the mmap), not from buf: Segment.close
       releases buf and words itself, and must be able to. */
    if (PyObject_GetBuffer(base, &self->map, PyBUF_WRITABLE) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    const uintptr_t map_start = (uintptr_t)self->map.buf;
    const uintptr_t buf_start = (uintptr_t)bv->buf;
    const Py_ssize_t len = bv->len;
    const char *why = NULL;
    if (!PyBuffer_IsContiguous(bv, 'C') || bv->readonly) {
        why = "buf must be a writable contiguous view";
    } else if (buf_start < map_start || len > self->map.len ||
               buf_start - map_start > (uintptr_t)(self->map.len - len)) {
        why = "buf must lie inside the object it views";
    } else if (wv->buf != bv->buf || wv->len != len) {
        why = "words must view the same memory as buf";
    } else if (buf_start & 7) {
        why = "buf must be 8-byte aligned";
    } else if (size < RECORD_HEADER_BYTES || (uint64_t)size > MAX_LANE_SIZE ||
               (size & (size - 1))) {
        why = "size must be a power of two, at least 16";
    } else if (data_at < 0 || (data_at & 7) || data_at > len - size) {
        why = "the lane's data must be 8-byte aligned and inside buf";
    } else if (ctl_word < 0 || ctl_word > len / 8 - L_HEAD - 1) {
        why = "the lane's control words must be inside buf";
    }
    if (why != NULL) {
        PyErr_SetString(PyExc_ValueError, why);
        Py_DECREF(self);
        return NULL;
    }
    uint64_t *w = (uint64_t *)bv->buf;
    self->data = (unsigned char *)bv->buf + data_at;
    self->tail_word = w + ctl_word + L_TAIL;
    self->head_word = w + ctl_word + L_HEAD;
    self->size = (uint64_t)size;
    /* From what a previous (maybe dead) owner published; checked at each push. */
    self->tail = load_relaxed(self->tail_word);
    self->head = __atomic_load_n(self->head_word, __ATOMIC_ACQUIRE);
    return (PyObject *)self;
}

static void
Lane_dealloc(Lane *self)
{
    if (self->map.obj != NULL) {
        PyBuffer_Release(&self->map);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(Lane_push_doc,
             "push($self, event_id, body, raised_ns, /)\n--\n\n"
             "Append one record; False (and nothing written) when the lane is full or its\n"
             "tail and head are inconsistent (counted in ``refused``).");

static PyObject *
Lane_push(Lane *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "push() takes exactly 3 arguments (%zd given)", nargs);
        return NULL;
    }
    /* Every argument is converted (which may run Python code) before the lane is touched. */
    const long event_id = PyLong_AsLong(args[0]);
    if (event_id == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (event_id < 0 || event_id > MAX_EVENT_ID) {
        PyErr_Format(PyExc_ValueError, "event_id must be between 0 and %d, not %ld", MAX_EVENT_ID,
                     event_id);
        return NULL;
    }
    const unsigned long long raised_ns = PyLong_AsUnsignedLongLong(args[2]);
    if (raised_ns == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer body;
    if (PyObject_GetBuffer(args[1], &body, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const int pushed = lane_push(self, (uint64_t)event_id, body.buf, (uint64_t)body.len,
                                 (uint64_t)raised_ns);
    PyBuffer_Release(&body);
    return PyBool_FromLong(pushed == PUSH_DONE);
}

static PyObject *
Lane_get_tail(Lane *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->tail);
}

static int
Lane_set_tail(Lane *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete tail");
        return -1;
    }
    const unsigned long long tail = PyLong_AsUnsignedLongLong(value);
    if (tail == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    self->tail = tail; /* any value is safe: push checks it against head */
    return 0;
}

static PyMethodDef Lane_methods[] = {
    {"push", (PyCFunction)(void (*)(void))Lane_push, METH_FASTCALL, Lane_push_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Lane_getset[] = {
    {"tail", (getter)Lane_get_tail, (setter)Lane_set_tail,
     "The next record's position (published after each push).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Lane_members[] = {
    {"refused", T_PYSSIZET, offsetof(Lane, refused), READONLY,
     "Pushes refused because the lane's tail and head were inconsistent."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mpevent.processes._fastpath.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("Lane(buf, words, ctl_word, data_at, size)\n--\n\n"
                        "The producer end of a lane: mpevent.shm.ring.LaneWriter in C."),
    .tp_methods = Lane_methods,
    .tp_members = Lane_members,
    .tp_getset = Lane_getset,
    .tp_new = Lane_new,
};

/* ------------------------------------------------------------------------ */
/* FastPath                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *fast;        /* _fast: event name -> (id, sub word, counters, idle word, max) */
    PyObject *words;       /* _words: the segment as a memoryview of uint64 */
    PyObject *lane;        /* _lane: a Lane, None, or anything else (pure path) */
    PyObject *doorbell;    /* _doorbell */
    Py_ssize_t sleep_word; /* _sleep_word */
    Py_ssize_t slow_calls; /* _slow_calls: calls handed to the pure path */
} FastPath;

typedef struct {
    Py_ssize_t event_id, sub_word, counters, idle_word, max_params;
} Entry;

/*
 * The words behind the pure path's `_words`, or NULL when that path must run:
 * unset, released (Segment.close) or not the writable 1-D view of uint64 that
 * `words[i]` indexes. A few loads per call.
 */
static uint64_t *
words_of(PyObject *view, Py_ssize_t *nwords)
{
    if (view == NULL || !PyMemoryView_Check(view) || view_released(view)) {
        return NULL;
    }
    const Py_buffer *b = PyMemoryView_GET_BUFFER(view);
    if (b->readonly || b->ndim != 1 || b->itemsize != 8 || b->format == NULL ||
        strcmp(b->format, "Q") != 0 || (b->strides != NULL && b->strides[0] != 8) ||
        ((uintptr_t)b->buf & 7)) {
        return NULL;
    }
    *nwords = b->len / 8;
    return (uint64_t *)b->buf;
}

static inline int
is_lane(PyObject *lane)
{
    return lane != NULL && Py_IS_TYPE(lane, &LaneType);
}

/* The entry the pure path would unpack from `_fast[event]`; 0: none usable. */
static int
entry_of(PyObject *fast, PyObject *event, Entry *e)
{
    if (fast == NULL || !PyDict_CheckExact(fast)) {
        return 0;
    }
    /* A key of a str subclass can run Python code in the lookup, which could
       replace the producer's dict: hold it. The entry is read out at once. */
    Py_INCREF(fast);
    PyObject *t = PyDict_GetItemWithError(fast, event);
    const int usable = t != NULL && PyTuple_CheckExact(t) && PyTuple_GET_SIZE(t) == 5;
    if (!usable) {
        PyErr_Clear();
        Py_DECREF(fast);
        return 0;
    }
    Py_ssize_t *v = &e->event_id;
    int ok = 1;
    for (Py_ssize_t i = 0; i < 5 && ok; i++) {
        PyObject *item = PyTuple_GET_ITEM(t, i);
        ok = PyLong_CheckExact(item); /* no __index__: no Python code */
        if (ok) {
            v[i] = PyLong_AsSsize_t(item);
            if (v[i] == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                ok = 0;
            }
        }
    }
    Py_DECREF(fast);
    return ok;
}

/* Every index the fast path will use is inside the view (else: pure path). */
static int
entry_fits(const Entry *e, Py_ssize_t nwords)
{
    return e->event_id >= 0 && e->event_id <= MAX_EVENT_ID && e->sub_word >= 0 &&
           e->sub_word < nwords && e->counters >= 0 && e->counters <= nwords - COUNTER_WORDS &&
           e->idle_word >= 0 && e->idle_word < nwords && e->max_params >= 0;
}

/* Doorbell.ring: one byte to the doorbell; full (EAGAIN) or no reader (EPIPE) is fine. */
static int
ring(PyObject *doorbell)
{
    if (doorbell_type == NULL || !Py_IS_TYPE(doorbell, doorbell_type)) {
        /* Not the class whose ring() this mirrors: call whatever it is. */
        Py_INCREF(doorbell);
        PyObject *r = PyObject_CallMethodNoArgs(doorbell, str_ring);
        Py_DECREF(doorbell);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    PyObject *fd_obj = PyObject_GetAttr(doorbell, str_write_fd); /* a slot: no Python code */
    if (fd_obj == NULL) {
        return -1;
    }
    const long fd = PyLong_AsLong(fd_obj);
    Py_DECREF(fd_obj);
    if (fd == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (fd < INT_MIN || fd > INT_MAX) {
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    for (;;) {
        if (write((int)fd, "\x01", 1) >= 0) {
            return 0;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EPIPE) {
            return 0;
        }
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0) { /* as os.write does (PEP 475) */
            return -1;
        }
    }
}

/* After a counted drop, as the pure path: a full lane may mean nobody drains it. */
static int
after_drop(PyObject *self)
{
    PyObject *hook = PyObject_GetAttr(self, str_on_hub_down);
    if (hook == NULL) {
        return -1;
    }
    const int none = hook == Py_None;
    Py_DECREF(hook);
    if (none) {
        return 0;
    }
    PyObject *r = PyObject_CallMethodNoArgs(self, str_check_hub); /* rate-limited there */
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

static PyObject *
call_pure(FastPath *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    self->slow_calls++;
    if (pure_raise_event == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "mpevent.processes._fastpath.configure() was not called");
        return NULL;
    }
    PyObject *bound = PyMethod_New(pure_raise_event, (PyObject *)self);
    if (bound == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Vectorcall(bound, args, (size_t)nargs, kwnames);
    Py_DECREF(bound);
    return result;
}

PyDoc_STRVAR(FastPath_raise_event_doc,
             "raise_event($self, /, event, params=None)\n--\n\n"
             "Queue one event for every subscriber; True when enqueued.\n\n"
             "The compiled fast path of Producer.raise_event (the reference), with its\n"
             "results, counters and exceptions.");

static PyObject *
FastPath_raise_event(FastPath *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (kwnames != NULL || nargs < 1 || nargs > 2 || !PyUnicode_CheckExact(args[0])) {
        return call_pure(self, args, nargs, kwnames);
    }
    PyObject *const event = args[0];
    PyObject *const params = nargs == 2 ? args[1] : Py_None;
    Entry e;
    if (!entry_of(self->fast, event, &e)) {
        return call_pure(self, args, nargs, kwnames); /* first raise on this lane */
    }
    /* Held across dumps, which may run code that replaces the producer's view. */
    PyObject *const view = Py_XNewRef(self->words);
    PyObject *body = NULL;
    PyObject *result;
    Py_ssize_t nwords;
    uint64_t *words = words_of(view, &nwords);
    if (words == NULL || !entry_fits(&e, nwords)) {
        goto pure;
    }
    const uint64_t subscribers = load_relaxed(&words[e.sub_word]);
    if (subscribers == 0) {
        if (!e.idle_word) {
            goto pure; /* this count takes the lock */
        }
        count(&words[e.idle_word]);
        Py_DECREF(view);
        Py_RETURN_FALSE;
    }
    /* idle_word == 0 also means "not this process's own lane, or no GIL":
       whatever the pure path does under its lock, it does there. */
    if (subscribers >= HUB_GONE || !e.idle_word || !is_lane(self->lane)) {
        goto pure;
    }
    const char *bytes = "";
    Py_ssize_t n = 0;
    if (params != Py_None) {
        if (!PyDict_CheckExact(params) || PyDict_GET_SIZE(params) == 0) {
            goto pure; /* lists, tuples, {} and what is refused: encode_params */
        }
        body = PyObject_Vectorcall(dumps, (PyObject *const *)&params, 1, NULL);
        if (body == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError)) {
                Py_DECREF(view);
                return NULL; /* what the pure path's dumps would raise too */
            }
            PyErr_Clear();
            goto pure; /* it says what is wrong, and counts it */
        }
        if (!PyBytes_CheckExact(body)) {
            goto pure;
        }
        bytes = PyBytes_AS_STRING(body);
        n = PyBytes_GET_SIZE(body);
        /* orjson writes NaN and infinity as null: the pure path tells them apart. */
        if (memmem(bytes, (size_t)n, "null", 4) != NULL || n > e.max_params) {
            goto pure;
        }
        /* dumps may have switched threads: read again what others may change. */
        words = words_of(view, &nwords);
        if (words == NULL || !is_lane(self->lane)) {
            goto pure;
        }
    }
    const Py_ssize_t sleep_word = self->sleep_word;
    if (sleep_word < 0 || sleep_word >= nwords || self->doorbell == NULL) {
        goto pure;
    }
    /* From here to the publish: no call into Python. */
    const int pushed = lane_push((Lane *)self->lane, (uint64_t)e.event_id, bytes, (uint64_t)n,
                                 monotonic_ns());
    Py_CLEAR(body);
    if (pushed == PUSH_DONE) {
        count(&words[e.counters + P_ENQUEUED]);
        if (load_relaxed(&words[sleep_word])) {
            __atomic_store_n(&words[sleep_word], 0, __ATOMIC_RELAXED);
            if (ring(self->doorbell) < 0) {
                Py_DECREF(view);
                return NULL;
            }
        }
        result = Py_True;
    } else {
        count(&words[e.counters + P_DROPPED]); /* full, or refused as inconsistent */
        if (after_drop((PyObject *)self) < 0) {
            Py_DECREF(view);
            return NULL;
        }
        result = Py_False;
    }
    Py_DECREF(view);
    return Py_NewRef(result);

pure:
    Py_XDECREF(body);
    Py_XDECREF(view);
    return call_pure(self, args, nargs, kwnames);
}

static int
FastPath_traverse(FastPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fast);
    Py_VISIT(self->words);
    Py_VISIT(self->lane);
    Py_VISIT(self->doorbell);
    return 0;
}

static int
FastPath_clear(FastPath *self)
{
    Py_CLEAR(self->fast);
    Py_CLEAR(self->words);
    Py_CLEAR(self->lane);
    Py_CLEAR(self->doorbell);
    return 0;
}

static void
FastPath_dealloc(FastPath *self)
{
    PyObject_GC_UnTrack(self);
    FastPath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef FastPath_methods[] = {
    {"raise_event", (PyCFunction)(void (*)(void))FastPath_raise_event,
     METH_FASTCALL | METH_KEYWORDS, FastPath_raise_event_doc},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef FastPath_members[] = {
    {"_fast", T_OBJECT_EX, offsetof(FastPath, fast), 0, NULL},
    {"_words", T_OBJECT_EX, offsetof(FastPath, words), 0, NULL},
    {"_lane", T_OBJECT_EX, offsetof(FastPath, lane), 0, NULL},
    {"_doorbell", T_OBJECT_EX, offsetof(FastPath, doorbell), 0, NULL},
    {"_sleep_word", T_PYSSIZET, offsetof(FastPath, sleep_word), 0, NULL},
    {"_slow_calls", T_PYSSIZET, offsetof(FastPath, slow_calls), READONLY,
     "raise_event calls handed to the pure path."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mpevent.processes._fastpath.FastPath",
    .tp_basicsize = sizeof(FastPath),
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = PyDoc_STR("Base of the compiled producer: raise_event in C over the "
                        "attributes the pure path reads."),
    .tp_traverse = (traverseproc)FastPath_traverse,
    .tp_clear = (inquiry)FastPath_clear,
    .tp_methods = FastPath_methods,
    .tp_members = FastPath_members,
    .tp_new = PyType_GenericNew, /* arguments are Producer.__init__'s */
};

/* ------------------------------------------------------------------------ */
/* The module                                                               */
/* ------------------------------------------------------------------------ */

PyDoc_STRVAR(configure_doc,
             "configure(pure_raise_event, doorbell_type, /)\n--\n\n"
             "The reference raise_event the fast path hands the rare cases to, and the\n"
             "Doorbell class whose ring() it performs itself.");

static PyObject *
configure(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyCallable_Check(args[0]) || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "configure(pure_raise_event, doorbell_type)");
        return NULL;
    }
    Py_XSETREF(pure_raise_event, Py_NewRef(args[0]));
    Py_XSETREF(doorbell_type, (PyTypeObject *)Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL, configure_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mpevent.processes._fastpath",
    .m_doc = "The producer's compiled fast path; mpevent.processes.fastpath decides if it runs.",
    .m_size = -1,
    .m_methods = module_methods,
};

/* What this file assumes of mpevent/shm/layout.py, for fastpath.py to compare. */
static int
add_constants(PyObject *m)
{
    if (PyModule_AddIntConstant(m, "RECORD_HEADER_BYTES", RECORD_HEADER_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "FLAG_WRAP", FLAG_WRAP) < 0 ||
        PyModule_AddIntConstant(m, "L_TAIL", L_TAIL) < 0 ||
        PyModule_AddIntConstant(m, "L_HEAD", L_HEAD) < 0 ||
        PyModule_AddIntConstant(m, "COUNTER_WORDS", COUNTER_WORDS) < 0 ||
        PyModule_AddIntConstant(m, "P_ENQUEUED", P_ENQUEUED) < 0 ||
        PyModule_AddIntConstant(m, "P_DROPPED", P_DROPPED) < 0 ||
        PyModule_AddIntConstant(m, "MAX_EVENT_ID", MAX_EVENT_ID) < 0) {
        return -1;
    }
    PyObject *hub_gone = PyLong_FromUnsignedLongLong(HUB_GONE);
    if (hub_gone == NULL) {
        return -1;
    }
    const int rc = PyModule_AddObjectRef(m, "HUB_GONE", hub_gone);
    Py_DECREF(hub_gone);
    return rc;
}

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (dumps == NULL) {
        PyObject *orjson = PyImport_ImportModule("orjson");
        if (orjson == NULL) {
            return NULL;
        }
        dumps = PyObject_GetAttrString(orjson, "dumps");
        Py_DECREF(orjson);
        if (dumps == NULL) {
            return NULL;
        }
        str_write_fd = PyUnicode_InternFromString("write_fd");
        str_ring = PyUnicode_InternFromString("ring");
        str_on_hub_down = PyUnicode_InternFromString("on_hub_down");
        str_check_hub = PyUnicode_InternFromString("_check_hub");
        if (!str_write_fd || !str_ring || !str_on_hub_down || !str_check_hub) {
            return NULL;
        }
    }
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&FastPathType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Lane", (PyObject *)&LaneType) < 0 ||
        PyModule_AddObjectRef(m, "FastPath", (PyObject *)&FastPathType) < 0 ||
        add_constants(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
