/** Linux x86-64/aarch64 constants, spelled as the kernel headers spell them (grep-able). */
export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SO_ERROR = 4;
export const SO_PEERCRED = 17;
export const SCM_RIGHTS = 1;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_CTRUNC = 0x8;
export const MSG_TRUNC = 0x20;
export const MSG_CMSG_CLOEXEC = 0x40000000;
export const SHUT_RDWR = 2;

export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_TRUNC = 0o1000;
export const O_NONBLOCK = 0o4000;
/** statfs f_type of filesystems that live in memory (a read never waits for a device). */
export const TMPFS_MAGIC = 0x01021994, RAMFS_MAGIC = 0x858458f6, HUGETLBFS_MAGIC = 0x958458f6;
export const O_DIRECT = 0o40000;
export const O_CLOEXEC = 0o2000000;
export const F_GETFL = 3;
export const F_SETFL = 4;
export const F_GETFD = 1;
export const SEEK_END = 2;

export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;

export const MFD_CLOEXEC = 1;
export const MFD_ALLOW_SEALING = 2;

export const EFD_CLOEXEC = 0o2000000;
export const EFD_NONBLOCK = 0o4000;
export const EFD_SEMAPHORE = 1;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export const EPOLL_CLOEXEC = 0o2000000;
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
export const EPOLLIN = 0x001;
export const EPOLLOUT = 0x004;
export const EPOLLERR = 0x008;
export const EPOLLHUP = 0x010;
export const EPOLLRDHUP = 0x2000;

export const POLLIN = 0x001;
export const POLLOUT = 0x004;
export const POLLERR = 0x008;
export const POLLHUP = 0x010;
export const POLLNVAL = 0x020;

/** BLKGETSIZE64: size in bytes of a block device. */
export const BLKGETSIZE64 = 0x80081272n;

export const AF_INET = 2;
export const SOCK_DGRAM = 2;

/** linux/if.h: interface names are at most IFNAMSIZ - 1 bytes plus a NUL. */
export const IFNAMSIZ = 16;
export const IFF_UP = 0x1;
/** struct ifreq (LP64): ifr_name[IFNAMSIZ], then a union (ifr_flags: short, ifr_mtu: int at offset 16). */
export const IFREQ_SIZE = 40;
export const IFREQ_UNION = 16;
/** linux/sockios.h */
export const SIOCGIFFLAGS = 0x8913;
export const SIOCSIFFLAGS = 0x8914;
export const SIOCGIFMTU = 0x8921;
export const SIOCSIFMTU = 0x8922;

/** linux/if_tun.h: TUNSETIFF = _IOW('T', 202, int), ... */
export const TUNSETIFF = 0x400454ca;
export const TUNSETOFFLOAD = 0x400454d0;
export const TUNGETIFF = 0x800454d2;
export const TUNSETVNETHDRSZ = 0x400454d8;
export const IFF_TUN = 0x0001;
export const IFF_TAP = 0x0002;
export const IFF_NO_PI = 0x1000;
export const IFF_VNET_HDR = 0x4000;
export const TUN_F_CSUM = 0x01;
export const TUN_F_TSO4 = 0x02;
export const TUN_F_TSO6 = 0x04;
export const TUN_F_TSO_ECN = 0x08;
export const TUN_F_UFO = 0x10;

// ---- filesystems: *at calls, O_PATH, statx, xattrs (virtio-fs) ----------------

/** O_DIRECTORY, O_NOFOLLOW and O_LARGEFILE differ between x86-64 and aarch64 (asm/fcntl.h). */
const ARM64 = process.arch === "arm64";
export const O_ACCMODE = 3;
export const O_NOCTTY = 0o400;
export const O_APPEND = 0o2000;
export const O_DSYNC = 0o10000;
export const O_SYNC = 0o4010000;
export const O_DIRECTORY = ARM64 ? 0o40000 : 0o200000;
export const O_NOFOLLOW = ARM64 ? 0o100000 : 0o400000;
/** The kernel's value; glibc defines O_LARGEFILE as 0 on 64-bit, but FUSE open flags may carry the bit. */
export const O_LARGEFILE = ARM64 ? 0o400000 : 0o100000;
export const O_NOATIME = 0o1000000;
export const O_PATH = 0o10000000;
export const O_TMPFILE = 0o20000000 | O_DIRECTORY;
export const F_DUPFD_CLOEXEC = 1030;

export const AT_FDCWD = -100;
export const AT_SYMLINK_NOFOLLOW = 0x100;
export const AT_REMOVEDIR = 0x200;
export const AT_SYMLINK_FOLLOW = 0x400;
export const AT_EMPTY_PATH = 0x1000;

/** linux/openat2.h: struct open_how { u64 flags, mode, resolve } and its resolve bits. */
export const OPEN_HOW_SIZE = 24;
export const RESOLVE_NO_XDEV = 0x01;
export const RESOLVE_NO_MAGICLINKS = 0x02;
export const RESOLVE_NO_SYMLINKS = 0x04;
export const RESOLVE_BENEATH = 0x08;
export const RESOLVE_IN_ROOT = 0x10;

/** linux/fs.h renameat2 flags. */
export const RENAME_NOREPLACE = 1;
export const RENAME_EXCHANGE = 2;
export const RENAME_WHITEOUT = 4;

/** linux/stat.h: statx masks (what to fill) and utimensat's special nanosecond values. */
export const STATX_TYPE = 0x1;
export const STATX_MODE = 0x2;
export const STATX_BASIC_STATS = 0x7ff;
export const STATX_BTIME = 0x800;
export const STATX_MNT_ID = 0x1000;
export const UTIME_NOW = (1 << 30) - 1;
export const UTIME_OMIT = (1 << 30) - 2;

/** File types (st_mode & S_IFMT); S_IFMT, S_IFREG and S_IFBLK are in structs.ts. */
export const S_IFDIR = 0o040000;
export const S_IFCHR = 0o020000;
export const S_IFIFO = 0o010000;
export const S_IFLNK = 0o120000;
export const S_IFSOCK = 0o140000;

/** dirent d_type values (dirent.h). */
export const DT_UNKNOWN = 0, DT_FIFO = 1, DT_CHR = 2, DT_DIR = 4, DT_BLK = 6, DT_REG = 8, DT_LNK = 10, DT_SOCK = 12;

export const SEEK_SET = 0;
export const SEEK_CUR = 1;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

export const XATTR_CREATE = 1;
export const XATTR_REPLACE = 2;

/** limits.h: a name is at most NAME_MAX bytes, a path (symlink target) PATH_MAX with its NUL. */
export const NAME_MAX = 255;
export const PATH_MAX = 4096;

/** statfs f_type of procfs: /proc/self/fd must really be procfs before we reopen through it. */
export const PROC_SUPER_MAGIC = 0x9fa0;

/**
 * Syscalls without a glibc wrapper in every glibc we run on (openat2, fchmodat2) or only in
 * newer ones (statx 2.28, renameat2 2.28, getdents64 2.30, copy_file_range 2.27): called
 * through syscall(2). Numbers from 424 on are the same on every architecture.
 */
export const SYS_getdents64 = ARM64 ? 61 : 217;
export const SYS_renameat2 = ARM64 ? 276 : 316;
export const SYS_copy_file_range = ARM64 ? 285 : 326;
export const SYS_statx = ARM64 ? 291 : 332;
export const SYS_openat2 = 437;
export const SYS_fchmodat2 = 452;

/** errno values the filesystem calls return that ffi/errno.ts does not export (asm-generic/errno*.h). */
export const ENXIO = 6, EXDEV = 18, ENOTDIR = 20, EISDIR = 21, EROFS = 30, EMLINK = 31,
  ENAMETOOLONG = 36, ENOTEMPTY = 39, ELOOP = 40, ENODATA = 61;
