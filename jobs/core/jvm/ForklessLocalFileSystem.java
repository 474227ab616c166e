package affluent.fs;

import java.io.File;
import java.io.IOException;
import java.net.URI;
import java.net.URISyntaxException;
import java.nio.file.Files;
import java.nio.file.attribute.PosixFilePermission;
import java.util.EnumSet;
import java.util.Set;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.ChecksumFs;
import org.apache.hadoop.fs.DelegateToFileSystem;
import org.apache.hadoop.fs.FileStatus;
import org.apache.hadoop.fs.FsConstants;
import org.apache.hadoop.fs.FsServerDefaults;
import org.apache.hadoop.fs.LocalFileSystem;
import org.apache.hadoop.fs.Path;
import org.apache.hadoop.fs.RawLocalFileSystem;
import org.apache.hadoop.fs.local.LocalConfigKeys;
import org.apache.hadoop.fs.permission.FsPermission;

/**
 * Hadoop's local file system without a process started per call.
 *
 * <p>Without Hadoop's native library (PySpark ships none), {@link RawLocalFileSystem} starts a
 * {@code readlink} process to tell whether a path is a symbolic link before every rename (each
 * Delta commit renames its log file and its checksum into place) and a {@code chmod} process for
 * every permission it sets (each file and folder it creates): more than a thousand processes for
 * one small batch, each forked from the driver's JVM. The same answers come from {@code java.nio}
 * here; symbolic links and modes beyond {@code rwxrwxrwx} still take Hadoop's own way.
 *
 * <p>Used for {@code file:} paths by a Spark whose executors share the driver's JVM (a local
 * master): {@code fs.file.impl} names {@link ForklessLocalFileSystem}, and
 * {@code fs.AbstractFileSystem.file.impl} names {@link Fs} (the {@code FileContext} side, which
 * Delta's log store uses).
 */
public class ForklessLocalFileSystem extends LocalFileSystem {

    public ForklessLocalFileSystem() {
        super(new Raw());
    }

    /** The raw (checksum-less) local file system with the two calls answered in-process. */
    public static class Raw extends RawLocalFileSystem {

        private static final PosixFilePermission[] BITS = {
            PosixFilePermission.OTHERS_EXECUTE, PosixFilePermission.OTHERS_WRITE, PosixFilePermission.OTHERS_READ,
            PosixFilePermission.GROUP_EXECUTE, PosixFilePermission.GROUP_WRITE, PosixFilePermission.GROUP_READ,
            PosixFilePermission.OWNER_EXECUTE, PosixFilePermission.OWNER_WRITE, PosixFilePermission.OWNER_READ,
        };

        @Override
        public void setPermission(Path p, FsPermission permission) throws IOException {
            int mode = permission.toShort();
            if ((mode & ~0777) != 0) {  // sticky bit and the like: Hadoop's chmod
                super.setPermission(p, permission);
                return;
            }
            Set<PosixFilePermission> wanted = EnumSet.noneOf(PosixFilePermission.class);
            for (int bit = 0; bit < BITS.length; bit++) {
                if ((mode & (1 << bit)) != 0) {
                    wanted.add(BITS[bit]);
                }
            }
            Files.setPosixFilePermissions(pathToFile(p).toPath(), wanted);
        }

        @Override
        public FileStatus getFileLinkStatus(Path f) throws IOException {
            File file = pathToFile(f);
            if (Files.isSymbolicLink(file.toPath())) {
                return super.getFileLinkStatus(f);
            }
            return getFileStatus(f);  // what Hadoop returns for a path that is not a link
        }
    }

    /** {@code FileContext}'s local file system (as Hadoop's {@code LocalFs}) over {@link Raw}. */
    public static class Fs extends ChecksumFs {

        public Fs(URI uri, Configuration conf) throws IOException, URISyntaxException {
            super(new RawFs(uri, conf));
        }
    }

    /** As Hadoop's {@code RawLocalFs}, over {@link Raw}. */
    public static class RawFs extends DelegateToFileSystem {

        public RawFs(URI uri, Configuration conf) throws IOException, URISyntaxException {
            super(uri, new Raw(), conf, FsConstants.LOCAL_FS_URI.getScheme(), false);
        }

        @Override
        public int getUriDefaultPort() {
            return -1;
        }

        @Override
        public FsServerDefaults getServerDefaults(Path f) throws IOException {
            return LocalConfigKeys.getServerDefaults();
        }

        @Override
        @Deprecated
        public FsServerDefaults getServerDefaults() throws IOException {
            return LocalConfigKeys.getServerDefaults();
        }

        @Override
        public boolean isValidName(String src) {
            return true;
        }
    }
}
