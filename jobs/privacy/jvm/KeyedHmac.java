package affluent.privacy;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.MessageDigest;
import java.util.Base64;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.Map;
import java.util.regex.Pattern;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;

import org.apache.spark.sql.api.java.UDF0;
import org.apache.spark.sql.api.java.UDF2;

/**
 * HMAC-SHA256 under a sub-key of the pseudonymisation key, computed where Spark runs.
 *
 * <p>The key is read by the JVM that evaluates the function (the Spark service's driver and
 * executors), from its own environment: AFFLUENT_PSEUDONYM_KEY, else the file named by
 * AFFLUENT_PSEUDONYM_KEY_FILE. A client names only the purpose ("person",
 * "establishment:chu_x", ...), so neither the key nor a sub-key enters a plan, a request or a
 * log. The values equal jobs.privacy.crypto's pads-as-data expressions and jobs.privacy.keys:
 * sub-key = HMAC(key, purpose), pseudonym = hex(HMAC(sub-key, UTF-8 message)); a null or empty
 * message gives null. Nothing is serialised with the function: the key stays in static state
 * that each JVM fills at first use.
 */
public final class KeyedHmac implements UDF2<String, String, String> {
    private static final long serialVersionUID = 1L;
    private static final Pattern HEX = Pattern.compile("[0-9A-Fa-f]+");
    private static final Pattern BASE64 = Pattern.compile("[A-Za-z0-9+/]+={0,2}");
    private static final Pattern BASE64_URLSAFE = Pattern.compile("[A-Za-z0-9_-]+={0,2}");
    private static volatile byte[] master;
    private static final ThreadLocal<Map<String, Mac>> MACS = ThreadLocal.withInitial(HashMap::new);

    static byte[] masterKey() {
        byte[] key = master;
        if (key == null) {
            synchronized (KeyedHmac.class) {
                if (master == null) {
                    master = load();
                }
                key = master;
            }
        }
        return key;
    }

    private static byte[] load() {
        String raw = System.getenv("AFFLUENT_PSEUDONYM_KEY");
        if (raw == null || raw.isBlank()) {
            String file = System.getenv("AFFLUENT_PSEUDONYM_KEY_FILE");
            if (file == null || file.isBlank()) {
                throw new IllegalStateException("the Spark service holds no pseudonymisation key: start it with "
                        + "AFFLUENT_PSEUDONYM_KEY_FILE set (see docs/security.md)");
            }
            try {
                raw = Files.readString(Path.of(file), StandardCharsets.US_ASCII);
            } catch (java.io.IOException e) {
                throw new IllegalStateException("the Spark service cannot read its key file " + file, e);
            }
        }
        String text = raw.strip();
        if (HEX.matcher(text).matches() && text.length() % 2 == 0) {
            return HexFormat.of().parseHex(text);
        }
        String bare = text.replaceAll("=+$", "");
        if (BASE64.matcher(text).matches()) {
            return Base64.getDecoder().decode(bare);
        }
        if (BASE64_URLSAFE.matcher(text).matches()) {
            return Base64.getUrlDecoder().decode(bare);
        }
        throw new IllegalStateException("the Spark service's pseudonymisation key is neither hex nor base64");
    }

    private static Mac mac(byte[] key) throws GeneralSecurityException {
        Mac mac = Mac.getInstance("HmacSHA256");
        mac.init(new SecretKeySpec(key, "HmacSHA256"));
        return mac;
    }

    private static Mac forPurpose(String purpose) throws GeneralSecurityException {
        Map<String, Mac> macs = MACS.get();
        Mac mac = macs.get(purpose);
        if (mac == null) {
            byte[] sub = mac(masterKey()).doFinal(purpose.getBytes(StandardCharsets.UTF_8));
            mac = mac(sub);
            macs.put(purpose, mac);
        }
        return mac;
    }

    @Override
    public String call(String purpose, String message) throws Exception {
        if (purpose == null || message == null || message.isEmpty()) {
            return null;
        }
        return HexFormat.of().formatHex(forPurpose(purpose).doFinal(message.getBytes(StandardCharsets.UTF_8)));
    }

    /** The key's public fingerprint (as jobs.privacy.keys.PseudonymKey.fingerprint), for the tables' checks. */
    public static final class Fingerprint implements UDF0<String> {
        private static final long serialVersionUID = 1L;

        @Override
        public String call() throws Exception {
            MessageDigest sha = MessageDigest.getInstance("SHA-256");
            sha.update("affluent-key-fingerprint:".getBytes(StandardCharsets.US_ASCII));
            return HexFormat.of().formatHex(sha.digest(masterKey())).substring(0, 16);
        }
    }
}
