/* llamabox launcher for Windows: the first bytes of every Windows runtime stub and bundle, as runtime/launcher.sh
 * is on Linux and macOS.
 *
 * What follows this program in the file (runtime/bundle_format.py defines the layout): a line
 * "# llamabox-stub: {JSON}" that says where the runtime payload is, the payload (a PyInstaller one-folder build
 * packed as .tar.gz), then the model. The payload is unpacked once per runtime build into
 * %LLAMABOX_CACHE%\runtime\<id> or %LOCALAPPDATA%\llamabox\runtime\<id>: into a folder of its own, marked whole,
 * then renamed into place, so a half-unpacked folder is never used. Every later start runs the runtime from there;
 * the weights are never unpacked (the runtime maps them from this file). Where the cache cannot be written, the
 * runtime is unpacked into a temporary folder for this run and removed after it, with one line saying so (and at
 * a later start, if the run ended without removing it: a console closed, a kill). The gzip stream is read to its
 * end, so that its checksum is checked: a damaged payload is refused, never cached.
 *
 * Why C and not a PyInstaller onefile: a onefile executable unpacks its whole Python at every start (2.4 s under
 * Wine on 2 cores for the runtime); this program starts in milliseconds. Why by hand: Windows has no tar and no
 * gzip API a program may count on, so the .tar.gz is read with zlib (linked statically) and a small tar reader for
 * the one kind of archive build.py writes (regular files and folders, PAX path records).
 *
 * The runtime runs as a child process in a job that ends with this one. Ctrl+C reaches both (they share the
 * console); once the runtime runs, this process ignores it and waits for the runtime to stop. The runtime's exit code is this one's; code
 * RETRY_EXIT_CODE means the runtime found its unpacked files damaged: the folder is set aside and unpacked again,
 * once.
 */
#ifndef UNICODE /* -municode defines it */
#define UNICODE
#define _UNICODE
#endif
#include <windows.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>
#include <zlib.h>

#define RETRY_EXIT_CODE 75 /* runtime/runtime_cache.py: damaged unpacked files */
#define HEADER_SEARCH (1 << 20)
#define CHUNK (256 << 10)
#define BIG 32768

static const char COMPLETE_MARKER[] = ".llamabox-complete";
static wchar_t self_path[BIG];
static const wchar_t *self_name = L"";

static void say(const char *format, ...) __attribute__((format(gnu_printf, 1, 2)));
static void say(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("llamabox: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    fflush(stderr);
    va_end(args);
}

/* A wide string as UTF-8, for messages (a static buffer per call site's argument slot: at most four at once). */
static const char *utf8(const wchar_t *text) {
    static char buffers[4][BIG];
    static int next = 0;
    char *out = buffers[next++ % 4];
    if (!WideCharToMultiByte(CP_UTF8, 0, text, -1, out, BIG, NULL, NULL)) strcpy(out, "?");
    return out;
}

static const char *last_error(void) {
    static char text[512];
    DWORD code = GetLastError();
    if (!FormatMessageA(FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS, NULL, code, 0, text, sizeof text, NULL))
        snprintf(text, sizeof text, "error %lu", (unsigned long)code);
    for (size_t n = strlen(text); n && (text[n - 1] == '\n' || text[n - 1] == '\r' || text[n - 1] == '.'); n--) text[n - 1] = 0;
    return text;
}

/* --- what build.py wrote after this program ------------------------------------------------------------------- */

typedef struct {
    unsigned long long payload_offset, payload_size, unpacked_size;
    char runtime_id[64];
    wchar_t executable[MAX_PATH];
} Stub;

static BOOL read_at(HANDLE file, unsigned long long offset, void *buffer, DWORD size, DWORD *got) {
    LARGE_INTEGER at;
    at.QuadPart = (LONGLONG)offset;
    return SetFilePointerEx(file, at, NULL, FILE_BEGIN) && ReadFile(file, buffer, size, got, NULL);
}

/* The string value of "key":"..." in `line`, or FALSE. */
static BOOL json_string(const char *line, const char *key, char *out, size_t size) {
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\":\"", key);
    const char *at = strstr(line, pattern);
    if (!at) return FALSE;
    at += strlen(pattern);
    const char *end = strchr(at, '"');
    if (!end || (size_t)(end - at) >= size) return FALSE;
    memcpy(out, at, end - at);
    out[end - at] = 0;
    return TRUE;
}

static BOOL json_number(const char *line, const char *key, unsigned long long *out) {
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\":", key);
    const char *at = strstr(line, pattern);
    if (!at) return FALSE;
    *out = strtoull(at + strlen(pattern), NULL, 10);
    return TRUE;
}

/* The stub's line sits right after this program's own bytes: the end of its last PE section. */
static BOOL read_stub(HANDLE file, Stub *stub) {
    static char head[HEADER_SEARCH + 1];
    DWORD got = 0;
    if (!read_at(file, 0, head, HEADER_SEARCH, &got) || got < 0x40) return FALSE;
    head[got] = 0;
    unsigned long long pe = *(DWORD *)(head + 0x3C); /* 64-bit sums below: no wrap-around */
    if (pe + 24 > got || memcmp(head + pe, "PE\0\0", 4)) return FALSE;
    WORD sections = *(WORD *)(head + pe + 6), optional = *(WORD *)(head + pe + 20);
    unsigned long long table = pe + 24 + optional, end = 0;
    for (WORD i = 0; i < sections; i++) {
        unsigned long long section = table + 40ULL * i;
        if (section + 40 > got) return FALSE;
        /* PointerToRawData + SizeOfRawData */
        unsigned long long raw_end = (unsigned long long)*(DWORD *)(head + section + 20) + *(DWORD *)(head + section + 16);
        if (raw_end > end) end = raw_end;
    }
    static const char prefix[] = "\n# llamabox-stub: ";
    if (end + sizeof prefix > got || memcmp(head + end, prefix, sizeof prefix - 1)) return FALSE;
    char *line = head + end + sizeof prefix - 1;
    char *newline = strchr(line, '\n');
    if (!newline) return FALSE;
    *newline = 0;
    char executable[MAX_PATH];
    if (!json_number(line, "payload_offset", &stub->payload_offset) || !json_number(line, "payload_size", &stub->payload_size) ||
        !json_string(line, "runtime_id", stub->runtime_id, sizeof stub->runtime_id) ||
        !json_string(line, "executable", executable, sizeof executable) ||
        !MultiByteToWideChar(CP_UTF8, 0, executable, -1, stub->executable, MAX_PATH))
        return FALSE;
    json_number(line, "unpacked_size", &stub->unpacked_size);
    return TRUE;
}

/* --- folders ----------------------------------------------------------------------------------------------- */

/* `path` and the folders above it. Only the last one's result counts: the first parts of a path (a drive, a
 * \\server\share, \\?\) cannot be made and need not be. */
static BOOL make_folders(const wchar_t *path) {
    wchar_t buffer[BIG];
    wcsncpy(buffer, path, BIG - 1);
    buffer[BIG - 1] = 0;
    for (wchar_t *p = buffer + 1; *p; p++) {
        if (*p != L'\\') continue;
        *p = 0;
        CreateDirectoryW(buffer, NULL);
        *p = L'\\';
    }
    return CreateDirectoryW(buffer, NULL) || GetLastError() == ERROR_ALREADY_EXISTS;
}

static void remove_tree(const wchar_t *path) {
    wchar_t pattern[BIG];
    WIN32_FIND_DATAW entry;
    swprintf(pattern, BIG, L"%ls\\*", path);
    HANDLE found = FindFirstFileW(pattern, &entry);
    if (found != INVALID_HANDLE_VALUE) {
        do {
            if (!wcscmp(entry.cFileName, L".") || !wcscmp(entry.cFileName, L"..")) continue;
            wchar_t child[BIG];
            swprintf(child, BIG, L"%ls\\%ls", path, entry.cFileName);
            if (entry.dwFileAttributes & FILE_ATTRIBUTE_REPARSE_POINT) { /* a junction or link: never what it points at */
                if (!RemoveDirectoryW(child)) DeleteFileW(child);
            } else if (entry.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY) {
                remove_tree(child);
            } else {
                SetFileAttributesW(child, FILE_ATTRIBUTE_NORMAL);
                DeleteFileW(child);
            }
        } while (FindNextFileW(found, &entry));
        FindClose(found);
    }
    RemoveDirectoryW(path);
}

static BOOL exists(const wchar_t *path) { return GetFileAttributesW(path) != INVALID_FILE_ATTRIBUTES; }

/* Whether `folder` holds this runtime, unpacked whole. */
static BOOL usable(const wchar_t *folder, const Stub *stub) {
    wchar_t path[BIG];
    swprintf(path, BIG, L"%ls\\%hs", folder, COMPLETE_MARKER);
    if (!exists(path)) return FALSE;
    swprintf(path, BIG, L"%ls\\%ls", folder, stub->executable);
    return exists(path);
}

/* --- unpacking: gzip through zlib, then tar ---------------------------------------------------------------- */

typedef struct {
    const wchar_t *root;
    unsigned char header[512];
    size_t have;                 /* bytes of the current header read */
    unsigned long long left;     /* bytes of the current member's data still to come */
    unsigned long long padding;  /* zero bytes after it, to the next 512 */
    HANDLE out;                  /* the file being written, or INVALID_HANDLE_VALUE */
    char *pax;                   /* the current PAX record block, collected */
    size_t pax_have, pax_size;
    char next_path[4096];        /* the path a PAX record gave the next member */
    BOOL done, failed, damaged; /* damaged: the archive's fault, not the folder's */
} Tar;

static unsigned long long octal(const unsigned char *field, size_t size) {
    unsigned long long value = 0;
    for (size_t i = 0; i < size && field[i] >= '0' && field[i] <= '7'; i++) value = value * 8 + (field[i] - '0');
    return value;
}

/* The Windows path for a member's name, refusing absolute names and "..": only below `root`. */
static BOOL member_path(Tar *tar, const char *name, wchar_t *out) {
    if (!*name || name[0] == '/' || name[0] == '\\') return FALSE;
    for (const unsigned char *c = (const unsigned char *)name; *c; c++) /* what Windows refuses in a name: damage */
        if (*c < 0x20 || strchr(":*?\"<>|", *c)) return FALSE;
    wchar_t relative[BIG];
    if (!MultiByteToWideChar(CP_UTF8, 0, name, -1, relative, BIG)) return FALSE;
    for (wchar_t *p = relative; *p; p++)
        if (*p == L'/') *p = L'\\';
    for (const wchar_t *part = relative; part; part = wcschr(part, L'\\') ? wcschr(part, L'\\') + 1 : NULL)
        if (part[0] == L'.' && part[1] == L'.' && (part[2] == L'\\' || part[2] == 0)) return FALSE; /* a ".." component */
    size_t n = wcslen(relative);
    while (n && relative[n - 1] == L'\\') relative[--n] = 0;
    swprintf(out, BIG, L"%ls\\%ls", tar->root, relative);
    return TRUE;
}

static void pax_records(Tar *tar) {
    /* Records "LENGTH key=value\n"; only `path` matters here. */
    char *p = tar->pax, *end = tar->pax + tar->pax_have;
    while (p < end) {
        char *space = memchr(p, ' ', end - p);
        unsigned long length = strtoul(p, NULL, 10);
        if (!space || !length || p + length > end) break;
        char *key = space + 1, *record_end = p + length - 1; /* the '\n' */
        if (!strncmp(key, "path=", 5) && (size_t)(record_end - key - 5) < sizeof tar->next_path) {
            memcpy(tar->next_path, key + 5, record_end - key - 5);
            tar->next_path[record_end - key - 5] = 0;
        }
        p += length;
    }
}

static void start_member(Tar *tar) {
    const unsigned char *h = tar->header;
    BOOL zero = TRUE;
    for (int i = 0; i < 512; i++) zero &= h[i] == 0;
    if (zero) {
        tar->done = TRUE;
        return;
    }
    unsigned long long size = octal(h + 124, 12);
    char type = (char)h[156], name[4096];
    if (tar->next_path[0]) {
        strcpy(name, tar->next_path);
        tar->next_path[0] = 0;
    } else {
        char prefix[156] = {0}, base[101] = {0};
        memcpy(prefix, h + 345, 155);
        memcpy(base, h, 100);
        snprintf(name, sizeof name, "%s%s%s", prefix, prefix[0] ? "/" : "", base);
    }
    tar->left = size;
    tar->padding = (512 - size % 512) % 512;
    tar->out = INVALID_HANDLE_VALUE;
    if (type == 'x') { /* PAX records for the next member */
        free(tar->pax);
        tar->pax = malloc(size + 1);
        tar->pax_have = 0;
        tar->pax_size = size;
        if (!tar->pax) tar->failed = TRUE;
        return;
    }
    if (type == 'g') return; /* global PAX records: nothing build.py writes matters */
    wchar_t path[BIG];
    if (!member_path(tar, name, path)) {
        say("the runtime's archive holds a member named %s, which is not unpacked; the file is damaged: copy or download it again", name);
        tar->failed = tar->damaged = TRUE;
        return;
    }
    if (type == '5') {
        if (!make_folders(path)) tar->failed = TRUE;
        return;
    }
    if (type != '0' && type != 0) return; /* links and devices: build.py writes none */
    wchar_t *slash = wcsrchr(path, L'\\');
    *slash = 0;
    BOOL made = make_folders(path);
    *slash = L'\\';
    tar->out = made ? CreateFileW(path, GENERIC_WRITE, 0, NULL, CREATE_ALWAYS, FILE_ATTRIBUTE_NORMAL, NULL) : INVALID_HANDLE_VALUE;
    if (tar->out == INVALID_HANDLE_VALUE) tar->failed = TRUE;
}

static void finish_member(Tar *tar) {
    if (tar->out != INVALID_HANDLE_VALUE) {
        if (!CloseHandle(tar->out)) tar->failed = TRUE;
        tar->out = INVALID_HANDLE_VALUE;
    }
    if (tar->pax && tar->pax_have == tar->pax_size) {
        pax_records(tar);
        free(tar->pax);
        tar->pax = NULL;
    }
}

static void tar_feed(Tar *tar, const unsigned char *data, size_t size) {
    while (size && !tar->done && !tar->failed) {
        if (tar->left) {
            size_t n = size < tar->left ? size : (size_t)tar->left;
            if (tar->out != INVALID_HANDLE_VALUE) {
                DWORD wrote;
                if (!WriteFile(tar->out, data, (DWORD)n, &wrote, NULL) || wrote != n) {
                    tar->failed = TRUE;
                    return;
                }
            } else if (tar->pax) {
                memcpy(tar->pax + tar->pax_have, data, n);
                tar->pax_have += n;
            }
            data += n, size -= n, tar->left -= n;
            if (!tar->left) finish_member(tar);
        } else if (tar->padding) {
            size_t n = size < tar->padding ? size : (size_t)tar->padding;
            data += n, size -= n, tar->padding -= n;
        } else {
            size_t n = 512 - tar->have < size ? 512 - tar->have : size;
            memcpy(tar->header + tar->have, data, n);
            data += n, size -= n, tar->have += n;
            if (tar->have == 512) {
                tar->have = 0;
                start_member(tar);
                if (!tar->left && !tar->done) finish_member(tar);
            }
        }
    }
}

typedef enum { UNPACKED, CANNOT_WRITE, DAMAGED } Unpacked;

/* Unpack the payload of `file` into the new folder `folder`. DAMAGED comes with a line saying so; CANNOT_WRITE
 * leaves the caller to try elsewhere. The whole gzip stream is read, so that its checksum is checked, also after a
 * write failed: garbled data can name a file Windows refuses or make one too big, and that is the payload's fault,
 * not the folder's, only the checksum can tell. */
static Unpacked unpack(HANDLE file, const Stub *stub, const wchar_t *folder) {
    if (!make_folders(folder)) return CANNOT_WRITE;
    static unsigned char in[CHUNK], out[CHUNK];
    z_stream z = {0};
    if (inflateInit2(&z, 16 + MAX_WBITS) != Z_OK) return CANNOT_WRITE;
    Tar tar = {.root = folder, .out = INVALID_HANDLE_VALUE};
    unsigned long long read = 0;
    int status = Z_OK;
    while (status != Z_STREAM_END && !tar.damaged) {
        if (z.avail_in == 0) {
            DWORD want = (DWORD)(stub->payload_size - read < CHUNK ? stub->payload_size - read : CHUNK), got = 0;
            if (!want || !read_at(file, stub->payload_offset + read, in, want, &got) || got != want) {
                say("%s is incomplete: the download or copy was cut short; copy or download it again", utf8(self_name));
                tar.failed = tar.damaged = TRUE;
                break;
            }
            read += got;
            z.next_in = in, z.avail_in = got;
        }
        z.next_out = out, z.avail_out = CHUNK;
        status = inflate(&z, Z_NO_FLUSH);
        if (status != Z_OK && status != Z_STREAM_END) {
            say("the runtime inside %s is damaged (%s); copy or download it again", utf8(self_path), z.msg ? z.msg : "bad data");
            tar.failed = tar.damaged = TRUE;
            break;
        }
        if (!tar.failed) tar_feed(&tar, out, CHUNK - z.avail_out); /* after the end block or a failure: only read */
    }
    inflateEnd(&z);
    if (tar.out != INVALID_HANDLE_VALUE) CloseHandle(tar.out);
    free(tar.pax);
    if (!tar.failed && !(tar.done && !tar.left)) {
        say("the runtime inside %s ends before its archive does; copy or download it again", utf8(self_path));
        tar.failed = tar.damaged = TRUE;
    }
    if (tar.failed) return tar.damaged ? DAMAGED : CANNOT_WRITE;
    wchar_t marker[BIG];
    swprintf(marker, BIG, L"%ls\\%hs", folder, COMPLETE_MARKER);
    HANDLE done = CreateFileW(marker, GENERIC_WRITE, 0, NULL, CREATE_ALWAYS, FILE_ATTRIBUTE_NORMAL, NULL);
    return done != INVALID_HANDLE_VALUE && CloseHandle(done) ? UNPACKED : CANNOT_WRITE;
}

/* --- where the runtime lives ------------------------------------------------------------------------------- */

static BOOL cache_root(wchar_t *out) {
    wchar_t base[BIG];
    if (GetEnvironmentVariableW(L"LLAMABOX_CACHE", base, BIG) && base[0]) {
        swprintf(out, BIG, L"%ls\\runtime", base);
        return TRUE;
    }
    if (GetEnvironmentVariableW(L"LOCALAPPDATA", base, BIG) && base[0]) {
        swprintf(out, BIG, L"%ls\\llamabox\\runtime", base);
        return TRUE;
    }
    return FALSE;
}

/* The runtime unpacked in the cache, unpacked now if it is not there whole: its folder goes into `folder`, and
 * `*temporary` says whether that folder is for this run only (a damaged copy in use could not be replaced). */
static Unpacked cached_runtime(HANDLE file, const Stub *stub, const wchar_t *root, wchar_t *folder, BOOL again, BOOL *temporary) {
    *temporary = FALSE;
    swprintf(folder, BIG, L"%ls\\%hs", root, stub->runtime_id);
    wchar_t aside[BIG];
    /* The names runtime/runtime_cache.py sweeps when they are left behind. */
    swprintf(aside, BIG, L"%ls\\.trash-%hs.%06lx-%lu", root, stub->runtime_id, (unsigned long)(GetCurrentProcessId() & 0xFFFFFF),
             (unsigned long)GetCurrentProcessId());
    if (again) { /* the runtime found these files damaged */
        if (MoveFileExW(folder, aside, 0)) remove_tree(aside);
    } else if (usable(folder, stub)) {
        return UNPACKED;
    }
    if (!make_folders(root)) return CANNOT_WRITE;
    wchar_t fresh[BIG];
    swprintf(fresh, BIG, L"%ls\\%hs.%06lx", root, stub->runtime_id, (unsigned long)(GetCurrentProcessId() & 0xFFFFFF));
    say("preparing the runtime for its first start: unpacking %llu MB into %s (once per runtime build)...",
        stub->unpacked_size / 1000000, utf8(folder));
    Unpacked result = unpack(file, stub, fresh);
    if (result != UNPACKED) {
        remove_tree(fresh);
        return result;
    }
    if (MoveFileExW(fresh, folder, 0)) return UNPACKED;
    if (!again && usable(folder, stub)) { /* another start unpacked it first */
        remove_tree(fresh);
        return UNPACKED;
    }
    if (MoveFileExW(folder, aside, 0)) remove_tree(aside); /* a damaged or half-removed copy */
    if (MoveFileExW(fresh, folder, 0)) return UNPACKED;
    wcscpy(folder, fresh); /* the old copy is in use by another start: run the new one for this run only */
    *temporary = TRUE;
    return UNPACKED;
}

/* Remove the temporary runtimes of runs that ended without removing theirs (a console closed, a kill):
 * %TEMP%\llamabox-<id>.<pid> whose process is gone. */
static void sweep_temporary(const wchar_t *temp) {
    wchar_t pattern[BIG];
    WIN32_FIND_DATAW entry;
    swprintf(pattern, BIG, L"%lsllamabox-*", temp);
    HANDLE found = FindFirstFileW(pattern, &entry);
    if (found == INVALID_HANDLE_VALUE) return;
    do {
        const wchar_t *dot = wcsrchr(entry.cFileName, L'.');
        if (!(entry.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY) || !dot || !dot[1]) continue;
        DWORD pid = (DWORD)wcstoul(dot + 1, NULL, 10);
        HANDLE process = pid ? OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, FALSE, pid) : NULL;
        if (process) {
            CloseHandle(process);
            continue;
        }
        if (GetLastError() != ERROR_INVALID_PARAMETER) continue; /* a process we may not see: maybe still running */
        wchar_t path[BIG];
        swprintf(path, BIG, L"%ls%ls", temp, entry.cFileName);
        remove_tree(path);
    } while (FindNextFileW(found, &entry));
    FindClose(found);
}

/* --- running it -------------------------------------------------------------------------------------------- */

/* The command line after the program's own name, as the user typed it. */
static const wchar_t *arguments(void) {
    const wchar_t *p = GetCommandLineW();
    if (*p == L'"') {
        p++;
        while (*p && *p != L'"') p++;
        if (*p) p++;
    } else {
        while (*p && *p != L' ' && *p != L'\t') p++;
    }
    return p;
}

static BOOL WINAPI ignore_interrupts(DWORD event) {
    /* Ctrl+C and Ctrl+Break reach the runtime too, which stops; wait for it. Closing the console ends us anyway. */
    return event == CTRL_C_EVENT || event == CTRL_BREAK_EVENT;
}

static DWORD launch(const wchar_t *folder, const Stub *stub, BOOL temporary) {
    wchar_t program[BIG];
    swprintf(program, BIG, L"%ls\\%ls", folder, stub->executable);
    const wchar_t *rest = arguments();
    size_t length = wcslen(program) + wcslen(rest) + 4;
    wchar_t *command = malloc(sizeof(wchar_t) * length);
    swprintf(command, length, L"\"%ls\"%ls", program, rest);
    SetEnvironmentVariableW(L"LLAMABOX_BUNDLE", self_path);
    SetEnvironmentVariableW(L"LLAMABOX_RUNTIME_DIR", folder);
    SetEnvironmentVariableW(L"LLAMABOX_RUNTIME_TEMPORARY", temporary ? L"1" : L"0");
    /* The runtime and whatever it starts end with this process (a window closed, a kill from a task manager). */
    HANDLE job = CreateJobObjectW(NULL, NULL);
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION limits = {0};
    limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
    if (job) SetInformationJobObject(job, JobObjectExtendedLimitInformation, &limits, sizeof limits);
    /* From now on Ctrl+C is the runtime's to answer (it reaches both processes): wait for it to stop. */
    SetConsoleCtrlHandler(ignore_interrupts, TRUE);
    STARTUPINFOW startup = {.cb = sizeof startup};
    PROCESS_INFORMATION child;
    if (!CreateProcessW(program, command, NULL, NULL, TRUE, CREATE_SUSPENDED, NULL, NULL, &startup, &child)) {
        say("cannot start the runtime %s: %s", utf8(program), last_error());
        free(command);
        return 1;
    }
    free(command);
    if (job) AssignProcessToJobObject(job, child.hProcess);
    ResumeThread(child.hThread);
    CloseHandle(child.hThread);
    WaitForSingleObject(child.hProcess, INFINITE);
    DWORD code = 1;
    GetExitCodeProcess(child.hProcess, &code);
    CloseHandle(child.hProcess);
    return code;
}


int wmain(void) {
    DWORD length = GetModuleFileNameW(NULL, self_path, BIG);
    if (!length || length >= BIG) {
        say("cannot tell where this program is: %s", last_error());
        return 1;
    }
    const wchar_t *slash = wcsrchr(self_path, L'\\');
    self_name = slash ? slash + 1 : self_path;
    HANDLE file = CreateFileW(self_path, GENERIC_READ, FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE, NULL,
                              OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, NULL);
    Stub stub = {0};
    if (file == INVALID_HANDLE_VALUE || !read_stub(file, &stub)) {
        say("%s is not a whole llamabox bundle (%s); copy or download it again", utf8(self_path),
            file == INVALID_HANDLE_VALUE ? last_error() : "no runtime description after the launcher");
        return 1;
    }
    LARGE_INTEGER size;
    if (!GetFileSizeEx(file, &size) || (unsigned long long)size.QuadPart < stub.payload_offset + stub.payload_size) {
        say("%s is incomplete (%llu bytes; its runtime alone is %llu): the download or copy was cut short; copy or download it again",
            utf8(self_name), (unsigned long long)size.QuadPart, stub.payload_offset + stub.payload_size);
        return 1;
    }
    wchar_t root[BIG], folder[BIG], temp[BIG];
    if (!GetTempPathW(BIG, temp)) wcscpy(temp, L".\\");
    sweep_temporary(temp);
    BOOL cached = cache_root(root);
    for (int attempt = 0; attempt < 2; attempt++) {
        BOOL temporary = FALSE;
        Unpacked result = cached ? cached_runtime(file, &stub, root, folder, attempt > 0, &temporary) : CANNOT_WRITE;
        if (result == DAMAGED) return 1; /* said why */
        if (result == CANNOT_WRITE) {
            swprintf(folder, BIG, L"%lsllamabox-%hs.%lu", temp, stub.runtime_id, (unsigned long)GetCurrentProcessId());
            if (cached)
                say("cannot unpack the runtime into %s (read-only, or the disk is full?); using a temporary folder for this run "
                    "(set LLAMABOX_CACHE to a writable folder to unpack only once)", utf8(root));
            else
                say("LOCALAPPDATA is not set; using a temporary folder for this run (set LLAMABOX_CACHE to a writable folder to unpack only once)");
            remove_tree(folder);
            result = unpack(file, &stub, folder);
            if (result != UNPACKED) {
                remove_tree(folder);
                if (result == CANNOT_WRITE)
                    say("cannot unpack the runtime into %s either; set LLAMABOX_CACHE to a writable folder with %llu MB free",
                        utf8(folder), stub.unpacked_size / 1000000 + 1);
                return 1;
            }
            temporary = TRUE;
        }
        if (attempt > 0) SetEnvironmentVariableW(L"LLAMABOX_RUNTIME_RETRY", L"1");
        DWORD code = launch(folder, &stub, temporary);
        if (temporary) remove_tree(folder);
        if (code != RETRY_EXIT_CODE || temporary) return (int)code;
    }
    return RETRY_EXIT_CODE;
}
